"""Fitting: :func:`fit` builds the step, places the data and runs the one loop.

The step is :mod:`hbjax.vi.step`, the loop :mod:`hbjax.vi.loop`; it runs until the fit converges
(:mod:`hbjax.vi.convergence`) or ``steps`` are done, and :func:`fit` returns a
:class:`FitResult`.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._types import PRNGKeyArray, PyTree, float_dtype
from . import checkpoint
from .convergence import Convergence, Status
from .devices import seed_from_key, to_host
from .guide import AbstractGuide, GaussianGuide, check_minibatch_guide
from .host import AbstractSampler, FullBatch, Minibatches
from .loop import FullBatchFeed, MinibatchFeed, Outcome, Saver, run
from .model import AbstractModel, AbstractUnitModel
from .objectives import default_objective
from .step import SVI, Objective, scale_by_sd


class ConvergenceWarning(UserWarning):
    """A fit reached its most steps without converging (its answer carries optimiser noise)."""


class NonFiniteLossError(FloatingPointError):
    """The loss or its gradient became NaN/inf; ``result`` holds the last good state."""

    def __init__(self, message: str, step: int, result: FitResult):
        super().__init__(message)
        self.step = step
        self.result = result


@dataclasses.dataclass(frozen=True)
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        model: the model that was fitted.
        guide: the fitted guide: the average of the iterates once averaging began
            (Polyak–Ruppert, :mod:`hbjax.vi.convergence`), else the last iterate.
        losses: ``[steps]`` loss of each step (before its update).
        opt_state: the optimiser state after the last step.
        steps: steps done (fewer than asked when the fit converged earlier).
        wall_seconds: total time of the fit, compilation included.
        compile_seconds: time to trace and compile the step.
        iterations_per_second: steps per second after compilation.
        num_traces: times the step was traced (1: compiled once).
        chunk_seconds: wall time of each completed chunk of steps (for benchmarks).
        batch_size: units per step of a minibatch fit (``None``: full batch).
        epochs: passes over the units (``steps`` for a full-batch fit).
        convergence: what the convergence check found (:class:`hbjax.vi.convergence.Status`:
            converged, the first and last averaged steps, the MCSE of the reported means
            in posterior-sd units); ``None`` for a fit run with ``convergence=None``.
    """

    model: AbstractModel
    guide: AbstractGuide
    losses: np.ndarray
    opt_state: Any
    steps: int
    wall_seconds: float
    compile_seconds: float
    iterations_per_second: float
    num_traces: int
    chunk_seconds: np.ndarray
    batch_size: int | None = None
    epochs: float | None = None
    convergence: Status | None = None

    @property
    def converged(self) -> bool | None:
        """Whether the fit converged (``None``: not checked)."""
        return None if self.convergence is None else self.convergence.converged

    @property
    def final_loss(self) -> float:
        """Mean loss over the last 1% of steps (at least one step): less noisy than the last."""
        tail = max(1, len(self.losses) // 100)
        return float(np.mean(self.losses[-tail:]))


def default_optimizer(
    learning_rate: float = 0.01,
    *,
    transition_steps: int = 1000,
    precondition: bool = True,
    max_step_sds: float = 0.5,
) -> optax.GradientTransformation:
    """AdamW with ``exponential_decay(lr, 1000, 0.99, end_value=1e-5)``, then :func:`scale_by_sd`.

    With ``precondition`` (the default) no mean moves more than ``max_step_sds`` of its
    current posterior sd a step (``scale_by_sd(learning_rate / max_step_sds)``), so narrow
    posteriors (best sellers) settle, and Adam's second moment forgets in ~100 steps
    (``b2=0.99``): a scale started too wide gets early gradients thousands of times its
    final ones, whose memory under ``b2=0.999`` held its later steps back for ~10,000
    steps (benchmarks/README.md). ``precondition=False`` is the article's optimiser.
    ``transition_steps``: steps per decay by 0.99. A minibatch fit scales it by the steps
    per epoch, so that the rate decays per pass over the data as in a full-batch fit.
    """
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0; got {learning_rate}.")
    schedule = optax.exponential_decay(
        init_value=learning_rate,
        transition_steps=max(int(transition_steps), 1),
        decay_rate=0.99,
        end_value=1e-5,
    )
    if not precondition:
        return optax.adamw(learning_rate=schedule)
    if not max_step_sds > 0:
        raise ValueError(f"max_step_sds must be > 0; got {max_step_sds}.")
    adam = optax.adamw(learning_rate=schedule, b2=0.99)
    return optax.chain(adam, scale_by_sd(learning_rate / max_step_sds))


def _typed_key(key: PRNGKeyArray) -> PRNGKeyArray:
    """A new-style typed key (legacy ``uint32[2]`` keys are wrapped)."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(key)


def _check_fit_arguments(
    model: AbstractModel, guide: AbstractGuide, steps: int, chunk_size: int
) -> None:
    if not isinstance(model, AbstractModel):
        raise TypeError(f"model must be an hbjax AbstractModel; got {type(model).__name__}.")
    if not isinstance(guide, AbstractGuide):
        raise TypeError(f"guide must be an hbjax AbstractGuide; got {type(guide).__name__}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps!r}.")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer; got {chunk_size!r}.")
    floats = float_dtype()
    other = {str(x.dtype) for x in jax.tree.leaves(eqx.filter(guide, eqx.is_inexact_array))}
    if other - {floats.name}:
        raise ValueError(
            f"the guide's parameters are {', '.join(sorted(other))}; hbjax fits in float32, or "
            "float64 with JAX's x64 on (JAX_ENABLE_X64=1 before JAX starts): build the guide "
            f"from model.latent_shapes(), which are {floats.name} now."
        )
    if isinstance(guide, GaussianGuide):
        expected = jax.tree.map(lambda s: s.shape, model.latent_shapes())
        got = jax.tree.map(jnp.shape, guide.mean())
        if jax.tree.structure(expected) != jax.tree.structure(got) or expected != got:
            raise ValueError(
                "the guide does not match the model's latents; build it with "
                "MeanFieldNormal.from_shapes(model.latent_shapes())."
            )


def _source(data: FullBatch | Minibatches | PyTree) -> FullBatch | Minibatches:
    """A data source: bare data is a full batch; a sampler gives minibatches."""
    if isinstance(data, FullBatch | Minibatches):
        return data
    if isinstance(data, AbstractSampler):
        return Minibatches(data)
    return FullBatch(data)


def fit(
    model: AbstractModel,
    guide: AbstractGuide,
    data: FullBatch | Minibatches | PyTree,
    *,
    key: PRNGKeyArray,
    steps: int,
    optimizer: optax.GradientTransformation
    | Callable[..., optax.GradientTransformation]
    | None = None,
    objective: Objective | None = None,
    convergence: Convergence | None = Convergence(),  # noqa: B008 - frozen
    checkpoints: checkpoint.Checkpoints | None = None,
    callback: Callable[[int, AbstractGuide], None] | None = None,
    progress: bool = True,
    chunk_size: int = 100,
) -> FitResult:
    """Fit ``guide`` to the posterior of ``model`` given ``data`` by stochastic optimisation.

    Args:
        model: the model.
        guide: the starting guide (e.g. ``MeanFieldNormal.from_shapes(...)``).
        data: a data source: :class:`~hbjax.FullBatch` (every step sees all the data,
            split over its mesh) or :class:`~hbjax.Minibatches` (whole units drawn each
            step). Bare data is a full batch on one device: host
            :class:`~hbjax.UnitRows`, placed data (e.g. :meth:`hbjax.counts.CountData.grid`),
            or any pytree of arrays.
        key: PRNG key; step ``i`` uses ``jax.random.fold_in(key, i)``.
        steps: the most optimisation steps (the fit stops earlier once converged).
        optimizer: any ``optax.GradientTransformation``, or a function that makes one
            from ``transition_steps=`` (e.g. ``functools.partial(hbjax.default_optimizer,
            0.02)``): called with 1,000, times the steps per epoch with minibatches, so
            that a rate decays per pass over the data. Default :func:`default_optimizer`.
        objective: ``(model, guide, panel, *, key) -> loss``; default
            :func:`hbjax.vi.objectives.default_objective` (:class:`hbjax.RenyiBound`, alpha 0,
            4 particles, the DReG gradient).
        convergence: when to start averaging the iterates and when to stop
            (:class:`hbjax.vi.convergence.Convergence`; checked every ``check_every``
            steps, rounded up to whole epochs with minibatches); ``None`` runs exactly
            ``steps`` steps and reports the last iterate. A fit that reaches ``steps``
            unconverged warns (:class:`ConvergenceWarning`) and says so in
            ``result.convergence``.
        checkpoints: save the state as the fit goes, or resume it
            (:class:`~hbjax.Checkpoints`: folder, interval, resume, fingerprint).
        callback: called after each chunk as ``callback(steps_done, guide)`` with a host
            copy of the reported guide (averaged once averaging began; e.g. to track
            recovery); its time is not counted in the fit's timings.
        progress: show a tqdm progress bar with iterations/s and the running loss.
        chunk_size: steps per compiled ``lax.scan`` call (the progress bar's granularity).

    Returns:
        A :class:`FitResult`.

    Raises:
        NonFiniteLossError: a step's loss or gradient was NaN/inf (names the step; the
            error's ``result`` holds the last good guide, also saved with checkpoints).
        hbjax.vi.checkpoint.CheckpointError: a checkpoint that cannot be used.

    Example:
        >>> import jax, hbjax
        >>> sim = hbjax.simulate(n_units=30, n_periods=10, n_groups=3)
        >>> data = hbjax.counts.elasticity_data(sim.frame)
        >>> model = data.model
        >>> guide = hbjax.MeanFieldNormal.from_shapes(
        ...     model.latent_shapes(), loc=model.init_latents(data.rows))
        >>> result = hbjax.fit(model, guide, hbjax.FullBatch(data.rows), key=jax.random.key(0),
        ...                    steps=50, progress=False)
        >>> result.losses.shape
        (50,)
    """
    if convergence is not None and not isinstance(convergence, Convergence):
        raise TypeError(
            f"convergence must be an hbjax.vi.convergence.Convergence or None; got {convergence!r}."
        )
    if checkpoints is not None and not isinstance(checkpoints, checkpoint.Checkpoints):
        raise TypeError(
            f"checkpoints must be hbjax.Checkpoints(folder, ...) or None; got {checkpoints!r}."
        )
    source = _source(data)
    _check_fit_arguments(model, guide, steps, chunk_size)
    start = time.perf_counter()
    key = _typed_key(key)
    if isinstance(source, Minibatches):
        if not isinstance(model, AbstractUnitModel) or model.unit_leaves() is None:
            raise TypeError(
                f"{type(model).__name__} is not an hbjax.AbstractUnitModel declaring its unit "
                "latents (unit_leaves): it cannot be minibatched; fit it with FullBatch."
            )
        check_minibatch_guide(guide)
        sampler = source.sampler(model, seed_from_key(key))
        feed: FullBatchFeed | MinibatchFeed = MinibatchFeed(sampler)
        mesh, per_epoch = sampler.mesh, sampler.steps_per_epoch
        # at most _CHUNK_BYTES of batches per chunk
        chunk = max(1, min(chunk_size, steps, _CHUNK_BYTES // sampler.bytes_per_step))
        # once per epoch, and no more often than a full-batch fit checks
        every = max(per_epoch, convergence.check_every if convergence is not None else 1)
        check_every = chunk * math.ceil(every / chunk)
    else:
        placed, mesh = source.place()
        feed, per_epoch = FullBatchFeed(placed), None
        check_every = convergence.check_every if convergence is not None else chunk_size
        chunk = math.gcd(min(chunk_size, steps), check_every)
    identity = None
    if checkpoints is not None:
        identity = {
            **{f"fit {name}": value for name, value in (checkpoints.fingerprint or {}).items()},
            "model": checkpoint.content_hash(to_host(model)),
            "objective": checkpoint.describe(default_objective if objective is None else objective),
        }
    saver = Saver(checkpoints, key, identity)
    if optimizer is None:
        optimizer = default_optimizer
    if not isinstance(optimizer, optax.GradientTransformation):  # decays per 1,000 epochs
        optimizer = optimizer(transition_steps=round(1000 * (per_epoch or 1.0)))
    svi = SVI(model, default_objective if objective is None else objective, optimizer)
    state = svi.init(guide)
    outcome = run(
        svi,
        state,
        feed,
        key=key,
        steps=steps,
        chunk=saver.align(chunk),
        mesh=mesh,
        convergence=convergence,
        check_every=check_every,
        min_average=max(convergence.min_average, 2 * check_every) if convergence else 0,
        saver=saver,
        callback=callback,
        progress=progress,
        steps_per_epoch=per_epoch,
    )
    batch_size = sampler.batch_size if isinstance(source, Minibatches) else None
    result = _result(svi, outcome, start, batch_size, per_epoch)
    if outcome.failed_at is not None:
        message = _non_finite_message(outcome.failed_at)
        if checkpoints is not None:
            message += f" The last good state is saved in {str(checkpoints.directory)!r}."
        raise NonFiniteLossError(message, step=outcome.failed_at, result=result)
    if outcome.status is not None and not outcome.status.converged:
        warnings.warn(
            _not_converged_message(outcome.status, steps), ConvergenceWarning, stacklevel=2
        )
    return result


def _result(
    svi: SVI, outcome: Outcome, start: float, batch_size: int | None, per_epoch: float | None
) -> FitResult:
    """The :class:`FitResult` of a run (host arrays; the reported guide)."""
    done = outcome.done if outcome.failed_at is None else outcome.failed_at
    seconds = outcome.loop_seconds
    return FitResult(
        model=to_host(svi.model),  # a model built from a placed panel holds replicated arrays
        guide=svi.guide(outcome.state),
        losses=outcome.losses,
        opt_state=outcome.state.opt_state,
        steps=done,
        wall_seconds=time.perf_counter() - start - outcome.callback_seconds,
        compile_seconds=outcome.compile_seconds,
        iterations_per_second=(done - outcome.first) / seconds if seconds > 0 else math.inf,
        num_traces=outcome.num_traces,
        chunk_seconds=outcome.chunk_seconds,
        batch_size=batch_size,
        epochs=None if per_epoch is None else done / per_epoch,
        convergence=outcome.status,
    )


def _not_converged_message(status: Status, steps: int) -> str:
    if status.average_from is None:
        rhat = "too few steps to tell" if status.rhat is None else f"split R-hat {status.rhat:.2f}"
        where = f"the iterates were not yet stationary ({rhat})"
    elif status.mcse is None:
        where = f"averaging began at step {status.average_from}, too late to measure its error"
    else:
        where = (
            f"averaging began at step {status.average_from}; the Monte Carlo error of the "
            f"means is {status.mcse:.3f} posterior sd (median; the worst watched mean's "
            f"{status.mcse_max:.3f}" + (f", {status.worst}" if status.worst else "") + ")"
        )
    return (
        f"the fit did not converge in {steps} steps: {where}. Its answer still carries "
        "optimiser noise; allow more steps (steps=, --steps)."
    )


def _non_finite_message(failed_at: int) -> str:
    return (
        f"the loss or its gradient became non-finite at step {failed_at} "
        f"(0-based; {failed_at} good steps kept). Try a smaller learning rate "
        "(e.g. fit(..., optimizer=hbjax.default_optimizer(1e-3)) or --lr 0.001), "
        "or clip gradients with optax.clip_by_global_norm."
    )


#: Most bytes of batches sent to the devices at once (a chunk; the next is being prepared).
_CHUNK_BYTES = 64 * 2**20
