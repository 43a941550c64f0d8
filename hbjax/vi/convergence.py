"""When a fit has converged: stationarity of the iterates, then averaging to a small MCSE.

Following Dhaka et al. (2020, "Robust, accurate stochastic optimization for variational
inference") and Welandawe et al. (2024, "A framework for improving the reliability of
black-box variational inference"):

1. **Stationarity.** Every ``check_every`` steps the loop looks at the second half of the
   iterates so far, cuts it into 4 pieces and treats them as chains: when the split-R-hat
   of the watched coordinates (median over coordinates; a drifting coordinate has a large
   R-hat whatever its noise) falls below ``rhat``, the iterates are stationary and
   Polyak–Ruppert averaging begins.
2. **Averaging.** The reported guide is the average of the iterates from then on
   (:class:`hbjax.vi.step.SVIState`). Its Monte Carlo standard error per watched coordinate
   is ``sd / sqrt(ESS)`` of the averaged iterates (ESS by Geyer's initial monotone
   sequence); means are measured in units of the guide's marginal sd, log-sds as they are
   (a relative error). The fit stops when the median over coordinates is below ``mcse``
   and the largest mean's below ``tail`` times that (a few slow coordinates, e.g. products
   with skewed posteriors, would otherwise carry several times the median's error), after
   at least ``min_average`` averaged steps.

The watched coordinates (:class:`Watch`) are at most ``max_per_leaf`` evenly spaced entries
of each leaf of the guide's mean and log marginal sd (:class:`hbjax.vi.guide.GaussianGuide`)
that the model reports (:meth:`hbjax.AbstractModel.reported_leaves`: for the elasticity
model, the elasticities), or of its raw parameters for other guides (then the MCSE is in
units of the iterates' own sd). A minibatch fit checks every ``check_every`` steps rounded
up to whole epochs (a unit moves only when drawn).
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._types import Array, Float, PyTree
from .guide import AbstractGuide, GaussianGuide


@dataclasses.dataclass(frozen=True)
class Convergence:
    """When to start averaging and when to stop (see the module docstring).

    Attributes:
        rhat: split-R-hat (median over watched coordinates) below which the iterates are
            stationary.
        mcse: Monte Carlo standard error (median over coordinates, in posterior-sd units)
            of the averaged guide at which the fit stops.
        tail: the largest watched mean's MCSE must also be at most ``tail * mcse``.
        check_every: steps between checks (a minibatch fit: rounded up to whole epochs).
        min_average: fewest averaged steps before stopping (:func:`hbjax.fit` makes it at
            least two check intervals).
        max_per_leaf: watched coordinates per parameter leaf.
    """

    rhat: float = 1.1
    mcse: float = 0.02
    tail: float = 2.5
    check_every: int = 100
    min_average: int = 500
    max_per_leaf: int = 32

    def __post_init__(self) -> None:
        """Refuse values that cannot work."""
        if not self.rhat > 1:
            raise ValueError(f"rhat must be > 1; got {self.rhat}.")
        if not self.mcse > 0:
            raise ValueError(f"mcse must be > 0; got {self.mcse}.")
        if not self.tail >= 1:
            raise ValueError(f"tail must be >= 1; got {self.tail}.")
        for name in ("check_every", "min_average", "max_per_leaf"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}.")


def split_rhat(trace: Float[np.ndarray, "step coord"], chains: int = 4) -> np.ndarray:
    """``[coord]`` split-R-hat of ``trace`` cut into ``chains`` consecutive pieces."""
    n = len(trace) // chains
    pieces = np.asarray(trace[len(trace) - n * chains :], np.float64).reshape(chains, n, -1)
    within = pieces.var(axis=1, ddof=1).mean(axis=0)
    between = n * pieces.mean(axis=1).var(axis=0, ddof=1)
    pooled = (n - 1) / n * within + between / n
    with np.errstate(divide="ignore", invalid="ignore"):
        rhat = np.sqrt(pooled / within)
    return np.where(within > 0, rhat, np.where(between > 0, np.inf, 1.0))


def effective_sample_size(trace: Float[np.ndarray, "step coord"]) -> np.ndarray:
    """``[coord]`` effective sample size of one chain (Geyer's initial monotone sequence)."""
    x = np.asarray(trace, np.float64)
    n = len(x)
    x = x - x.mean(axis=0)
    size = 1 << (2 * n - 1).bit_length()
    spectrum = np.fft.rfft(x, n=size, axis=0)
    acov = np.fft.irfft(spectrum * np.conj(spectrum), n=size, axis=0)[:n] / n
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = acov / acov[0]
    rho = np.nan_to_num(rho, nan=0.0)
    pairs = rho[: n - n % 2].reshape(-1, 2, rho.shape[1]).sum(axis=1)  # Gamma_k = rho_2k + rho_2k+1
    positive = np.cumprod(pairs > 0, axis=0).astype(bool)  # initial positive sequence
    monotone = np.minimum.accumulate(np.where(positive, pairs, np.inf), axis=0)
    tau = -1.0 + 2.0 * np.sum(np.where(positive, monotone, 0.0), axis=0)
    return n / np.maximum(tau, 1.0 / np.log10(max(n, 10)))


class Watch:
    """Which coordinates of a guide the loop records every step (see the module docstring).

    Attributes:
        indices: evenly spaced flat indices into each watched leaf (an empty array for a
            leaf that is not watched).
    """

    def __init__(
        self, guide: AbstractGuide, max_per_leaf: int, reported: PyTree[bool] | None = None
    ):
        """Watch up to ``max_per_leaf`` entries of each ``reported`` leaf (default: all)."""
        leaves = jax.eval_shape(_watched_leaves, guide)  # sizes only: nothing computed
        self.gaussian = isinstance(guide, GaussianGuide)
        keep = [True] * len(leaves)
        if isinstance(guide, GaussianGuide) and reported is not None:
            flags = jax.tree.structure(guide.mean()).flatten_up_to(reported)
            # the reported means, then every log sd: a prediction sums reported and
            # nuisance latents, and is as wide as their sds say
            keep = [bool(f) for f in flags] + [True] * len(flags)
        self.indices = tuple(
            np.unique(np.linspace(0, x.size - 1, min(x.size, max_per_leaf)).round().astype(int))
            if k
            else np.zeros(0, int)
            for x, k in zip(leaves, keep, strict=True)
        )

    def names(self, guide: AbstractGuide) -> list[str]:
        """``[coord]`` each watched coordinate as ``path[index]`` (a mean's, then a log sd's)."""
        if isinstance(guide, GaussianGuide):
            paths = [jax.tree_util.keystr(p) for p, _ in _paths(guide.mean())]
            paths += [f"log sd {p}" for p in paths]
        else:
            paths = [
                jax.tree_util.keystr(p) for p, _ in _paths(eqx.filter(guide, eqx.is_inexact_array))
            ]
        return [f"{p}[{i}]" for p, idx in zip(paths, self.indices, strict=True) for i in idx]

    @property
    def n_means(self) -> int:
        """How many watched coordinates are means (the rest are log sds)."""
        if not self.gaussian:
            return sum(len(i) for i in self.indices)
        return sum(len(i) for i in self.indices[: len(self.indices) // 2])

    def __call__(self, guide: AbstractGuide) -> Float[Array, " coord"]:
        """The watched coordinates of ``guide``."""
        leaves = _watched_leaves(guide)
        return jnp.concatenate(
            [jnp.ravel(x)[i].astype(jnp.float32) for x, i in zip(leaves, self.indices, strict=True)]
        )

    def scale(self, guide: AbstractGuide) -> Float[Array, " coord"]:
        """``[coord]`` the unit each watched coordinate's MCSE is measured in.

        The marginal sd for a mean, 1 for a log sd (a relative error); NaN for guides that
        are not Gaussian (their MCSE is then measured in units of the iterates' own sd).
        """
        count = sum(len(i) for i in self.indices)
        if not isinstance(guide, GaussianGuide):
            return jnp.full(count, jnp.nan, jnp.float32)
        scales = jax.tree.leaves(guide.marginal_scale())
        means = self.indices[: len(scales)]
        parts = [jnp.ravel(s)[i] for s, i in zip(scales, means, strict=True)]
        parts += [jnp.ones(len(i)) for i in self.indices[len(scales) :]]
        return jnp.concatenate(parts).astype(jnp.float32)


def _paths(tree: PyTree) -> list:
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def _watched_leaves(guide: AbstractGuide) -> list[Array]:
    if isinstance(guide, GaussianGuide):
        return [
            *jax.tree.leaves(guide.mean()),
            *(jnp.log(s) for s in jax.tree.leaves(guide.marginal_scale())),
        ]
    return jax.tree.leaves(eqx.filter(guide, eqx.is_inexact_array))


@dataclasses.dataclass
class Status:
    """What the monitor knows after a check (also what ``FitResult`` reports).

    Attributes:
        converged: stationary, averaged, and the MCSE below the target.
        average_from: the first averaged step (``None``: not averaging).
        average_to: the last step averaged into the reported guide (``None``: not averaging).
        rhat: median split-R-hat of the watched coordinates at the last stationarity check.
        mcse: median MCSE of the averaged means over watched coordinates (posterior-sd
            units).
        mcse_max: the largest.
        mcse_sd: median MCSE of the averaged log sds (relative error of the sds).
        mcse_sd_max: the largest.
        worst: the mean with the largest MCSE, as a path into the guide's latents (e.g.
            ``.slopes['log_price']['unit'][0]``), where the loop named its coordinates.
    """

    converged: bool = False
    average_from: int | None = None
    average_to: int | None = None
    rhat: float | None = None
    mcse: float | None = None
    mcse_max: float | None = None
    mcse_sd: float | None = None
    mcse_sd_max: float | None = None
    worst: str | None = None

    def to_dict(self) -> dict[str, object]:
        """JSON-ready fields."""
        return dataclasses.asdict(self)


class Monitor:
    """Host side of the convergence check: the watched trace and the decisions.

    ``record(values, first_step)`` takes the watched coordinates of each step (one row per
    step); ``check(step, scale)``, called by the loop every check interval, decides whether
    averaging starts (returns ``"average"``), the fit has converged (``"stop"``) or neither
    (``None``). Averaging lasts at least ``min_average`` steps and starts no earlier than
    ``settle`` (where the objective's schedules end), on iterates from there on. The first
    ``n_means`` coordinates are means, the others log sds (default: all means); both
    medians must reach the target.
    """

    def __init__(
        self,
        config: Convergence,
        min_average: int,
        n_means: int | None = None,
        settle: int = 0,
        names: list[str] | None = None,
    ):
        self.config, self.min_average, self.settle = config, min_average, settle
        self.names = names  # each coordinate's name (Watch.names)
        self.n_means = n_means  # the first n_means coordinates are means, the rest log sds
        self.rows: list[np.ndarray] = []
        self.steps: list[int] = []
        self.status = Status()

    def record(self, values: np.ndarray, first_step: int) -> None:
        """Rows of a chunk: ``values[i]`` is the iterate after step ``first_step + i``."""
        for i, row in enumerate(np.asarray(values)):
            self.rows.append(row)
            self.steps.append(first_step + i + 1)  # the iterate after this many steps

    def _trace(self, since: int) -> np.ndarray:
        keep = [r for r, s in zip(self.rows, self.steps, strict=True) if s > since]
        return np.stack(keep) if keep else np.zeros((0, 0))

    def check(self, step: int, scale: np.ndarray) -> str | None:
        """The decision at ``step`` (see the class docstring)."""
        status = self.status
        if status.converged:
            return "stop"
        if status.average_from is None:
            if step < self.settle:
                return None
            trace = self._trace(max(step // 2, self.settle))
            if len(trace) < 40:
                return None
            status.rhat = float(np.median(split_rhat(trace)))
            if status.rhat < self.config.rhat:
                status.average_from = step
                self._forget(step)
                return "average"
            self._forget(step // 2)
            return None
        status.average_to = step
        trace = self._trace(status.average_from)
        if len(trace) < 40:
            return None
        sd = trace.std(axis=0, ddof=1)
        mcse = sd / np.sqrt(effective_sample_size(trace))
        unit = np.where(np.isfinite(scale), scale, sd)  # NaN: not a Gaussian guide
        with np.errstate(divide="ignore", invalid="ignore"):
            relative = np.where(unit > 0, mcse / unit, 0.0)
        n_means = len(relative) if self.n_means is None else self.n_means
        means, sds = relative[:n_means], relative[n_means:]
        status.mcse, status.mcse_max = float(np.median(means)), float(np.max(means))
        if self.names is not None and len(means):
            status.worst = self.names[int(np.argmax(means))]
        status.mcse_sd = float(np.median(sds)) if len(sds) else None
        status.mcse_sd_max = float(np.max(sds)) if len(sds) else None
        typical = max(status.mcse, status.mcse_sd or 0.0)
        largest = max(status.mcse_max, status.mcse_sd_max or 0.0)
        small = typical <= self.config.mcse and largest <= self.config.tail * self.config.mcse
        if small and step - status.average_from >= self.min_average:
            status.converged = True
            return "stop"
        return None

    def _forget(self, before: int) -> None:
        """Drop rows no later check will read (memory stays bounded by the window)."""
        keep = [i for i, s in enumerate(self.steps) if s > before]
        self.rows = [self.rows[i] for i in keep]
        self.steps = [self.steps[i] for i in keep]

    def state(self) -> dict[str, np.ndarray]:
        """The trace as arrays (for a checkpoint)."""
        rows = np.stack(self.rows) if self.rows else np.zeros((0, 0), np.float32)
        return {"rows": rows.astype(np.float32), "steps": np.asarray(self.steps, np.int64)}

    def restore(self, rows: np.ndarray, steps: np.ndarray, status: dict[str, object]) -> None:
        """Back to a checkpoint's trace and status."""
        self.rows = list(np.asarray(rows))
        self.steps = [int(s) for s in steps]
        self.status = Status(**status)


__all__ = [
    "Convergence",
    "Monitor",
    "Status",
    "effective_sample_size",
    "split_rhat",
    "Watch",
]
