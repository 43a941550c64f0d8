"""Checks of a fit that can tell a good fit from a bad one, unit by unit.

A global importance check (:func:`hbjax.vi.diagnostics.importance_diagnostics`) weighs draws of
*all* latents at once; with thousands of units its Pareto ``k`` is large for any Gaussian
guide, so it alarms every user and informs none. These checks look at one unit's own
latents at a time (a product's elasticity and intercept: two dimensions), given the shared
latents (global, category and period effects: few, pinned by all units), where importance
sampling and MCMC are informative:

* :func:`unit_importance`: for a random subsample of units, draw each unit's latents from
  the guide's marginal of its block, weigh them by the model's density of that unit given
  the shared latents at the guide's mean, and fit PSIS's Pareto ``k`` per unit. The share
  of units with ``k >= 0.7`` and the worst units are reported.
* :func:`nuts_check`: NUTS (BlackJAX, an optional dependency) on a random subsample of
  units, each unit's block given shared latents drawn from the guide (a few draws, one
  chain each, pooled), against the guide's marginals: sd ratio and whether the NUTS
  median lies in the guide's 90% interval, per unit. Conditioning on the shared latents,
  rather than refitting a sub-panel with its own hierarchy, keeps each unit's data and
  neighbours as in the fit (a sub-panel of a few units would have far looser category
  and period effects, so its intervals could not be compared); the shared part of the
  guide is what it takes from the fit.

Both need a :class:`~hbjax.vi.guide.GaussianGuide` (the block's marginal in closed form), a
model with :meth:`~hbjax.AbstractModel.unit_leaves` and
:meth:`~hbjax.AbstractModel.slot_log_joint`, and a host panel.

The count application's check of the *model* (counts replicated from the fit against the
observed ones) is :func:`hbjax.counts.predictive_check`.
"""

from __future__ import annotations

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from .._types import PRNGKeyArray, PyTree, float_dtype
from ..extras import optional_import
from .devices import seed_from_key
from .diagnostics import K_OK, psis
from .guide import DependentNormal, GaussianGuide, MeanFieldNormal, linear_moments, sample_once
from .host import AbstractHostData
from .model import AbstractModel, AbstractUnitModel

#: A unit check is "good" when at most this share of units has ``k >= 0.7``.
GOOD_SHARE = 0.05
#: The NUTS check is "good" when the median sd ratio lies in this range ...
SD_RATIO_RANGE = (0.8, 1.25)
#: ... and at least this share of NUTS medians lies in the guide's 90% interval.
GOOD_COVERAGE = 0.9


def _check_inputs(model: AbstractModel, guide: object, panel: object) -> list[int]:
    """Positions of the unit leaves among the latents, or one clear error naming what is missing."""
    if not isinstance(guide, GaussianGuide):
        raise TypeError(
            f"the unit checks need a Gaussian guide (MeanFieldNormal, UnitBlockNormal, "
            f"LowRankNormal); got {type(guide).__name__}."
        )
    if not isinstance(panel, AbstractHostData) or panel.mesh is not None:
        raise TypeError(
            "the unit checks take host data: host "
            "UnitRows (e.g. hbjax.counts.from_frame(...).rows)."
        )
    if not isinstance(model, AbstractUnitModel):
        raise ValueError(f"{type(model).__name__} declares no unit latents: nothing per unit.")
    flags = model.unit_leaves()
    return [i for i, flag in enumerate(jax.tree.leaves(flags)) if flag]


def _choose_units(n_units: int, num_units: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted unit indices: all units when there are at most ``num_units``, else a sample."""
    if isinstance(num_units, bool) or not isinstance(num_units, int) or num_units < 1:
        raise ValueError(f"num_units must be a positive int; got {num_units!r}.")
    if n_units <= num_units:
        return np.arange(n_units)
    return np.sort(rng.choice(n_units, num_units, replace=False))


def unit_block_moments(
    guide: GaussianGuide, ids: list[int], units: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[slot, k]`` and covariance ``[slot, k, k]`` of each unit's block under the guide.

    ``ids``: positions of the ``k`` unit leaves among the flattened latents.

    Exact (:func:`hbjax.vi.guide.linear_moments`): the variances of each unit leaf and of each
    pair's sum give the covariances, ``cov(a, b) = (var(a + b) - var(a) - var(b)) / 2``.
    """
    pairs = [(j, m) for j in range(len(ids)) for m in range(j)]
    take = jnp.asarray(units)

    def blocks(latents: PyTree) -> list:
        leaves = jax.tree.leaves(latents)
        values = [jnp.take(leaves[i], take) for i in ids]
        return values + [values[j] + values[m] for j, m in pairs]

    moments = linear_moments(guide, blocks)
    if moments is None:
        raise ValueError(f"{type(guide).__name__}: no closed-form block marginals.")
    mean, sd = (np.stack(x, axis=-1).astype(np.float64) for x in moments)
    k = len(ids)
    cov = np.zeros((len(units), k, k))
    for j in range(k):
        cov[:, j, j] = sd[:, j] ** 2
    for p, (j, m) in enumerate(pairs):
        cov[:, j, m] = cov[:, m, j] = (sd[:, k + p] ** 2 - sd[:, j] ** 2 - sd[:, m] ** 2) / 2
    return mean[:, :k], cov


def _block_draws(
    guide: GaussianGuide,
    ids: list[int],
    panel: AbstractHostData,
    num_units: int,
    num_draws: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A subsample of units and draws of their blocks from the guide's marginals (host).

    Returns ``units [slot]``, the blocks' ``mean [slot, k]`` and Cholesky factors
    ``[slot, k, k]``, the standard normals ``[draw, slot, k]`` and the draws
    ``[draw, slot, k]``.
    """
    units = _choose_units(panel.n_units, num_units, rng)
    mean, cov = unit_block_moments(guide, ids, units)
    chol = np.linalg.cholesky(cov + 1e-12 * np.eye(cov.shape[-1]))
    eps = rng.standard_normal((num_draws, *mean.shape))
    blocks = mean + np.einsum("ukl,sul->suk", chol, eps)
    return units, mean, chol, eps, blocks


def _with_blocks(shared: PyTree, ids: list[int], block: jax.Array) -> PyTree:
    """``shared`` (a latents pytree) with its unit leaves replaced by ``block[:, j]``."""
    leaves, treedef = jax.tree.flatten(shared)
    for j, i in enumerate(ids):
        leaves[i] = block[..., j]
    return jax.tree.unflatten(treedef, leaves)


@dataclasses.dataclass(frozen=True)
class UnitImportance:
    """Per-unit PSIS ``k`` of the guide's blocks (:func:`unit_importance`).

    Attributes:
        units: ``[n]`` the checked units' indices.
        k_hat: ``[n]`` each unit's Pareto ``k`` (``inf`` when its weights are not finite).
        num_draws: draws per unit.
        n_units: units in the panel.
        advice: what to try when the check is poor (it depends on the guide checked).
    """

    units: np.ndarray
    k_hat: np.ndarray
    num_draws: int
    n_units: int
    advice: str = "compare with NUTS (hbjax check)"

    @property
    def share_poor(self) -> float:
        """Share of checked units with ``k >= 0.7``."""
        return float(np.mean(self.k_hat >= K_OK))

    @property
    def good(self) -> bool:
        """At most :data:`GOOD_SHARE` of the checked units have ``k >= 0.7``."""
        return self.share_poor <= GOOD_SHARE

    def worst(self, n: int = 5) -> np.ndarray:
        """Indices of the ``n`` units with the largest ``k``, worst first."""
        return self.units[np.argsort(-self.k_hat, kind="stable")[:n]]

    @property
    def verdict(self) -> str:
        """``"good"`` or ``"poor"`` and the figures, in words."""
        share = f"{self.share_poor:.1%} of {len(self.units)} units checked have k-hat >= {K_OK}"
        median = f"median k-hat {np.median(self.k_hat):.2f}"
        if self.good:
            return f"good ({share}; {median})"
        return (
            f"poor ({share}; {median}): the guide misses the shape of these units' "
            f"posteriors; {self.advice}"
        )

    def to_dict(self, labels: pd.Index | None = None) -> dict[str, object]:
        """For JSON: the share, median, draws, verdict and the worst units (labelled)."""
        worst = self.worst()
        names = worst.tolist() if labels is None else [str(labels[i]) for i in worst]
        k_of = dict(zip(self.units.tolist(), self.k_hat.tolist(), strict=True))
        return {
            "units_checked": len(self.units),
            "draws_per_unit": self.num_draws,
            "share_k_hat_above_0_7": self.share_poor,
            "median_k_hat": float(np.median(self.k_hat)),
            "worst": [
                {"unit": name, "k_hat": k_of[i] if math.isfinite(k_of[i]) else None}
                for name, i in zip(names, worst.tolist(), strict=True)
            ],
            "verdict": self.verdict,
        }


def unit_importance(
    model: AbstractModel,
    guide: GaussianGuide,
    panel: AbstractHostData,
    *,
    key: PRNGKeyArray,
    num_units: int = 1000,
    num_draws: int = 200,
) -> UnitImportance:
    """Pareto ``k`` of each unit's block of the guide, given the shared latents.

    For each of up to ``num_units`` random units, ``num_draws`` draws ``z_i`` of its block
    from the guide's marginal ``q_i`` are weighed by ``p(z_i, rows_i | shared) / q_i(z_i)``
    with the shared latents at the guide's mean (:meth:`AbstractModel.slot_log_joint`);
    PSIS fits ``k`` to each unit's weights. ``k < 0.7``: the guide's block covers that
    unit's posterior; above, it misses part of it (too narrow, or the wrong shape).

    Args:
        model: the fitted model.
        guide: the fitted guide.
        panel: the host panel it was fitted to.
        key: PRNG key (the subsample and the draws).
        num_units: units to check (all when the panel has fewer).
        num_draws: draws per unit (at least 50; 200 gives a stable ``k``).
    """
    ids = _check_inputs(model, guide, panel)
    if isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < 50:
        raise ValueError(f"num_draws must be an int >= 50; got {num_draws!r}.")
    # drawn on the host: the check compiles one function, not a sampler too
    rng = np.random.default_rng(seed_from_key(key))
    units, mean, chol, eps, blocks = _block_draws(guide, ids, panel, num_units, num_draws, rng)
    log_det = np.sum(np.log(np.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
    log_q = np.sum(-0.5 * eps**2, axis=-1) - log_det - mean.shape[-1] * 0.5 * math.log(2 * math.pi)
    log_p = _slot_log_joint(model, guide.mean(), ids, panel.unit_batch(units), blocks)
    log_w = log_p - log_q
    k_hat = np.array(
        [psis(w)[1] if np.all(np.isfinite(w)) else math.inf for w in log_w.T], np.float64
    )
    inner = guide.base if isinstance(guide, DependentNormal) else guide
    advice = UnitImportance.advice
    if isinstance(inner, MeanFieldNormal):  # each unit's latents independent: couple them
        advice = f"try the unit-block guide, and {advice}"
    return UnitImportance(units, k_hat, num_draws, panel.n_units, advice)


def _slot_log_joint(
    model: AbstractModel, shared: PyTree, ids: list[int], batch: object, blocks: np.ndarray
) -> np.ndarray:
    """``[draw, slot]`` the model's slot terms of each draw of the blocks ``[draw, slot, k]``."""

    @eqx.filter_jit
    def evaluate(model: AbstractModel, shared: PyTree, batch: object, blocks: jax.Array):  # noqa: ANN202
        def one(block: jax.Array) -> jax.Array:
            return model.slot_log_joint(_with_blocks(shared, ids, block), batch)

        return jax.lax.map(one, blocks, batch_size=16)

    values = evaluate(model, shared, batch, jnp.asarray(blocks, float_dtype()))
    return np.asarray(values, np.float64)


@dataclasses.dataclass(frozen=True)
class NutsCheck:
    """The guide's marginals of a subsample of units against NUTS (:func:`nuts_check`).

    Attributes:
        table: one row per checked unit and reported unit leaf: ``unit`` (index),
            ``leaf``, the guide's ``mean``, ``sd``, ``q05``, ``q95``, NUTS's ``nuts_mean``,
            ``nuts_sd``, ``nuts_median``, ``sd_ratio`` (guide / NUTS) and ``covered``
            (the NUTS median inside the guide's 90% interval).
        num_shared: shared-latent draws (one NUTS chain each).
        draws: NUTS draws per chain after warm-up.
        divergences: divergent NUTS transitions, all chains.
    """

    table: pd.DataFrame
    num_shared: int
    draws: int
    divergences: int

    @property
    def sd_ratio(self) -> float:
        """Median over units of the guide's sd / NUTS's sd."""
        return float(np.median(self.table["sd_ratio"]))

    @property
    def coverage(self) -> float:
        """Share of units whose NUTS median lies in the guide's 90% interval."""
        return float(np.mean(self.table["covered"]))

    @property
    def good(self) -> bool:
        """Whether the sd ratio and the coverage are both within the limits."""
        lo, hi = SD_RATIO_RANGE
        return lo <= self.sd_ratio <= hi and self.coverage >= GOOD_COVERAGE

    @property
    def verdict(self) -> str:
        """``"good"`` or ``"poor"`` and the figures, in words."""
        figures = (
            f"median sd ratio (guide / NUTS) {self.sd_ratio:.2f}, NUTS median inside the "
            f"guide's 90% interval for {self.coverage:.0%} of {self.table['unit'].nunique()} units"
        )
        if self.good:
            return f"good ({figures})"
        lo, hi = SD_RATIO_RANGE
        return f"poor ({figures}; good is {lo}-{hi} and >= {GOOD_COVERAGE:.0%})"


def nuts_check(
    model: AbstractModel,
    guide: GaussianGuide,
    panel: AbstractHostData,
    *,
    key: PRNGKeyArray,
    num_units: int = 50,
    num_shared: int = 4,
    warmup: int = 300,
    draws: int = 300,
) -> NutsCheck:
    """NUTS on a random subsample of units, given shared latents drawn from the guide.

    For each of ``num_shared`` draws of the whole latents from the guide, one BlackJAX NUTS
    chain (window adaptation, ``warmup`` steps, then ``draws``) samples the checked units'
    blocks from ``p(z_i | shared, rows_i)`` with the shared latents fixed at that draw; the
    chains' draws pooled approximate each unit's posterior marginal with the shared part
    taken from the guide. Compared with the guide's exact marginals of the model's
    reported unit leaves (:meth:`AbstractModel.reported_leaves`; for the elasticity model
    the unit elasticity's latent, an affine map of the elasticity in the centred hierarchy).

    Needs BlackJAX (``pip install "hbjax[blackjax]"``).

    Args:
        model: the fitted model.
        guide: the fitted guide.
        panel: the host panel it was fitted to.
        key: PRNG key (the subsample, the shared draws, NUTS).
        num_units: units to check.
        num_shared: shared-latent draws (chains).
        warmup: adaptation steps per chain.
        draws: draws per chain.
    """
    blackjax = optional_import("blackjax", purpose="hbjax check (NUTS)")
    ids = _check_inputs(model, guide, panel)
    limits = (("num_shared", num_shared, 1), ("warmup", warmup, 10), ("draws", draws, 20))
    for name, value, least in limits:
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}; got {value!r}.")
    unit_key, shared_key, chain_key = jax.random.split(key, 3)
    units = _choose_units(panel.n_units, num_units, np.random.default_rng(seed_from_key(unit_key)))
    mean, cov = unit_block_moments(guide, ids, units)
    batch = panel.unit_batch(units)
    shared = sample_once(guide, num_shared, shared_key)
    start = jnp.asarray(mean.ravel(), float_dtype())

    def chain(key: PRNGKeyArray, shared: PyTree) -> tuple[jax.Array, jax.Array]:
        def log_density(flat: jax.Array) -> jax.Array:
            block = flat.reshape(mean.shape)
            return jnp.sum(model.slot_log_joint(_with_blocks(shared, ids, block), batch))

        warm_key, sample_key = jax.random.split(key)
        adapt = blackjax.window_adaptation(blackjax.nuts, log_density, target_acceptance_rate=0.9)
        (state, parameters), _ = adapt.run(warm_key, start, num_steps=warmup)
        kernel = blackjax.nuts(log_density, **parameters).step

        def one(state, key):  # noqa: ANN001, ANN202
            state, info = kernel(key, state)
            return state, (state.position, info.is_divergent)

        _, (positions, divergent) = jax.lax.scan(one, state, jax.random.split(sample_key, draws))
        return positions.reshape(draws, *mean.shape), jnp.sum(divergent)

    run = eqx.filter_jit(jax.vmap(chain))
    positions, divergent = run(jax.random.split(chain_key, num_shared), shared)
    pooled = np.asarray(positions, np.float64).reshape(-1, *mean.shape)  # [draw, unit, k]
    reported = jax.tree.leaves(model.reported_leaves())
    paths = jax.tree_util.tree_leaves_with_path(model.latent_shapes())
    names = [jax.tree_util.keystr(path).lstrip(".") for path, _ in paths]
    rows = []
    for j, leaf in enumerate(ids):
        if not reported[leaf]:
            continue
        sd = np.sqrt(cov[:, j, j])
        q05, q95 = mean[:, j] - 1.6448536 * sd, mean[:, j] + 1.6448536 * sd
        nuts = pooled[:, :, j]
        median = np.median(nuts, axis=0)
        rows.append(
            pd.DataFrame(
                {
                    "unit": units,
                    "leaf": names[leaf],
                    "mean": mean[:, j],
                    "sd": sd,
                    "q05": q05,
                    "q95": q95,
                    "nuts_mean": nuts.mean(axis=0),
                    "nuts_sd": nuts.std(axis=0, ddof=1),
                    "nuts_median": median,
                    "sd_ratio": sd / nuts.std(axis=0, ddof=1),
                    "covered": (q05 <= median) & (median <= q95),
                }
            )
        )
    if not rows:
        raise ValueError(
            f"{type(model).__name__} reports none of its per-unit latents (reported_leaves): "
            "nothing for NUTS to compare."
        )
    return NutsCheck(pd.concat(rows, ignore_index=True), num_shared, draws, int(np.sum(divergent)))


def on_value_scale(table: pd.DataFrame, loc: float, scale: float, leaf: str) -> pd.DataFrame:
    """A :class:`NutsCheck` table of a latent ``v`` restated for the value ``loc + scale v``.

    Means, quantiles and medians map affinely, sds scale; ratios and coverage are the same.
    """
    table = table.copy()
    for column in ("mean", "q05", "q95", "nuts_mean", "nuts_median"):
        table[column] = loc + scale * table[column]
    for column in ("sd", "nuts_sd"):
        table[column] = scale * table[column]
    table["leaf"] = leaf
    return table


__all__ = [
    "NutsCheck",
    "UnitImportance",
    "nuts_check",
    "on_value_scale",
    "unit_block_moments",
    "unit_importance",
]
