"""Fitting: :func:`fit` builds the step, places the data and runs the one loop.

The step is :mod:`hbjax.vi.step`, the loop :mod:`hbjax.vi.loop`; it runs until the fit converges
(:mod:`hbjax.vi.convergence`) or ``steps`` are done, and :func:`fit` returns a
:class:`FitResult`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from .._types import PRNGKeyArray, PyTree
from . import checkpoint
from .convergence import Convergence, Status
from .devices import seed_from_key, to_host
from .guide import AbstractGuide, check_minibatch_guide
from .host import AbstractHostData, AbstractSampler
from .loop import Checkpoints, FullBatch, Minibatches, Outcome, run
from .model import AbstractModel, AbstractUnitModel
from .objectives import default_objective
from .step import SVI, Objective


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
    learning_rate: float = 0.01, *, transition_steps: int = 1000
) -> optax.GradientTransformation:
    """The article's optimiser: AdamW with ``exponential_decay(lr, 1000, 0.99, end_value=1e-5)``.

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
    return optax.adamw(learning_rate=schedule)


def _typed_key(key: PRNGKeyArray) -> PRNGKeyArray:
    """A new-style typed key (legacy ``uint32[2]`` keys are wrapped)."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(key)


def _check_fit_arguments(
    model: AbstractModel, guide: AbstractGuide, panel: PyTree, steps: int, chunk_size: int
) -> None:
    if not isinstance(model, AbstractModel):
        raise TypeError(f"model must be an hbjax AbstractModel; got {type(model).__name__}.")
    if not isinstance(guide, AbstractGuide):
        raise TypeError(f"guide must be an hbjax AbstractGuide; got {type(guide).__name__}.")
    leaves = jax.tree.leaves(panel)
    if not leaves or not all(isinstance(x, jax.Array | np.ndarray) for x in leaves):
        raise TypeError(
            "the data must be hbjax.UnitRows (e.g. hbjax.counts.from_frame(...).rows), placed "
            f"data, or a pytree of arrays for a model of your own; got {type(panel).__name__}."
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps!r}.")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer; got {chunk_size!r}.")
    loc = getattr(guide, "loc", None)
    if loc is not None:
        expected = jax.tree.map(lambda s: s.shape, model.latent_shapes())
        got = jax.tree.map(lambda x: jnp.shape(x), loc)
        if jax.tree.structure(expected) != jax.tree.structure(got) or expected != got:
            raise ValueError(
                "the guide does not match the model's latents; build it with "
                "MeanFieldNormal.from_shapes(model.latent_shapes())."
            )


def fit(
    model: AbstractModel,
    guide: AbstractGuide,
    panel: PyTree,
    *,
    key: PRNGKeyArray,
    steps: int,
    optimizer: optax.GradientTransformation | None = None,
    objective: Objective | None = None,
    chunk_size: int = 100,
    progress: bool = True,
    mesh: Mesh | None = None,
    callback: Callable[[int, AbstractGuide], None] | None = None,
    batch_size: int | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 1000,
    resume: bool = False,
    convergence: Convergence | None = Convergence(),  # noqa: B008 - frozen
    fingerprint: Mapping[str, object] | None = None,
) -> FitResult:
    """Fit ``guide`` to the posterior of ``model`` given ``panel`` by stochastic optimisation.

    Args:
        model: the model.
        guide: the starting guide (e.g. ``MeanFieldNormal.from_shapes(...)``).
        panel: the data: host :class:`~hbjax.UnitRows` (an :class:`~hbjax.AbstractRowModel`:
            sharded and minibatched; e.g. ``hbjax.counts.from_frame(...).rows``), placed
            data (e.g. :meth:`hbjax.counts.CountData.grid`), or any pytree of arrays (one
            device).
        key: PRNG key; step ``i`` uses ``jax.random.fold_in(key, i)``.
        steps: the most optimisation steps (the fit stops earlier once converged).
        optimizer: any ``optax.GradientTransformation``; default :func:`default_optimizer`.
        objective: ``(model, guide, panel, *, key) -> loss``; default
            :func:`hbjax.vi.objectives.default_objective` (:class:`hbjax.RenyiBound`, alpha 0,
            4 particles, the DReG gradient).
        chunk_size: steps per compiled ``lax.scan`` call (the progress bar's granularity).
        progress: show a tqdm progress bar with iterations/s and the running loss.
        mesh: split host rows over this mesh (:func:`hbjax.make_mesh`; default: one
            device) with :func:`hbjax.shard_rows`; placed data keeps its mesh and layout.
            Parameters are replicated; the result does not depend on the number of devices.
        callback: called after each chunk as ``callback(steps_done, guide)`` with a host
            copy of the reported guide (averaged once averaging began; e.g. to track
            recovery); its time is not counted in the fit's timings.
        batch_size: minibatch SVI, units per step (:class:`hbjax.RowSampler`). Each step
            draws units in every block of the sharding plan (rounded up to a multiple of the
            block count, itself a multiple of the device count; the result reports it),
            weights them so that log weights are unbiased, and updates the drawn units'
            guide parameters and every shared one; the optimiser state of units not drawn
            is left as it was (lazy Adam). ``panel`` must be host :class:`~hbjax.UnitRows`
            with an :class:`~hbjax.AbstractRowModel` (memory-mapped ones too: a folder from
            ``hbjax prepare``), or a sampler of your own (an
            :class:`hbjax.parallel.host.AbstractSampler`, with ``batch_size`` left out): it
            stays on the host and
            chunks of batches go to the devices, each prepared while the previous one
            runs. The default optimiser's decay is then per epoch (``transition_steps =
            1000 x steps per epoch``).
        checkpoint_dir: save the fit's state (guide, optimiser state, step, average), the
            key, the losses and the convergence trace there every ``checkpoint_every``
            steps, at the end, and at the last good step when a step goes non-finite
            (:mod:`hbjax.vi.checkpoint`: Equinox serialisation, written atomically). A folder
            that already holds a checkpoint is refused unless ``resume``.
        checkpoint_every: steps between checkpoints (chunks are aligned to it).
        resume: continue from the checkpoint in ``checkpoint_dir`` up to ``steps`` in all
            (a folder without one is refused); with the same key and device count the
            result is the one of the uninterrupted fit, averaging and stopping included. A
            checkpoint of another model (its arrays, options and priors), objective, guide,
            state shape or key, or another ``fingerprint``, is refused, naming what differs.
        convergence: when to start averaging the iterates and when to stop
            (:class:`hbjax.vi.convergence.Convergence`; checked every ``check_every`` steps,
            rounded up to whole epochs with ``batch_size``); ``None`` runs exactly ``steps`` steps
            and reports the last iterate. A fit that reaches ``steps`` unconverged warns
            (:class:`ConvergenceWarning`) and says so in ``result.convergence``.
        fingerprint: with ``checkpoint_dir``: what else identifies this fit, which hbjax
            cannot read off its arguments (JSON-able values): the data's content
            (:func:`hbjax.vi.checkpoint.content_hash`), the optimiser's hyperparameters, the
            objective's settings. Stored with the checkpoint; a resume with other values is
            refused. :func:`hbjax.counts.fit_counts` passes the rows' hash, the model's
            spec and its config.

    Returns:
        A :class:`FitResult`.

    Raises:
        NonFiniteLossError: a step's loss or gradient was NaN/inf (names the step; the
            error's ``result`` holds the last good guide, also saved with checkpoint_dir).
        hbjax.vi.checkpoint.CheckpointError: a checkpoint that cannot be used (see above).

    Example:
        >>> import jax, hbjax
        >>> sim = hbjax.simulate(n_units=30, n_periods=10, n_groups=3)
        >>> data = hbjax.counts.elasticity_data(sim.frame)
        >>> model = data.model
        >>> guide = hbjax.MeanFieldNormal.from_shapes(
        ...     model.latent_shapes(), loc=model.init_latents(data.rows))
        >>> result = hbjax.fit(model, guide, data.rows, key=jax.random.key(0), steps=50,
        ...                    progress=False)
        >>> result.losses.shape
        (50,)
    """
    if convergence is not None and not isinstance(convergence, Convergence):
        raise TypeError(
            f"convergence must be an hbjax.vi.convergence.Convergence or None; got {convergence!r}."
        )
    minibatch = isinstance(panel, AbstractSampler) or batch_size is not None
    start = time.perf_counter()
    key = _typed_key(key)
    if minibatch:
        sampler = _sampler(model, guide, panel, batch_size, mesh, key, steps, chunk_size)
        source: FullBatch | Minibatches = Minibatches(sampler)
        mesh, per_epoch = sampler.mesh, sampler.steps_per_epoch
        # at most _CHUNK_BYTES of batches per chunk
        chunk = max(1, min(chunk_size, steps, _CHUNK_BYTES // sampler.bytes_per_step))
        # once per epoch, and no more often than a full-batch fit checks
        every = max(per_epoch, convergence.check_every if convergence is not None else 1)
        check_every = chunk * math.ceil(every / chunk)
        if optimizer is None:  # the article's decay, per epoch
            optimizer = default_optimizer(transition_steps=round(1000 * per_epoch))
    else:
        _check_fit_arguments(model, guide, panel, steps, chunk_size)
        panel, mesh = _place(model, panel, mesh)
        source, per_epoch = FullBatch(panel), None
        check_every = convergence.check_every if convergence is not None else chunk_size
        chunk = math.gcd(min(chunk_size, steps), check_every)
    identity = None
    if checkpoint_dir is not None:
        identity = {
            **{f"fit {name}": value for name, value in (fingerprint or {}).items()},
            "model": checkpoint.content_hash(to_host(model)),
            "objective": checkpoint.describe(default_objective if objective is None else objective),
        }
    saver = Checkpoints(checkpoint_dir, checkpoint_every, resume, key, identity)
    svi = SVI(
        model,
        default_objective if objective is None else objective,
        default_optimizer() if optimizer is None else optimizer,
    )
    # the loop donates the state's buffers: keep the caller's guide
    state = svi.init(jax.tree.map(lambda x: jnp.copy(x) if eqx.is_array(x) else x, guide))
    outcome = run(
        svi,
        state,
        source,
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
    result = _result(svi, outcome, start, sampler.batch_size if minibatch else None, per_epoch)
    if outcome.failed_at is not None:
        message = _non_finite_message(outcome.failed_at)
        if checkpoint_dir is not None:
            message += f" The last good state is saved in {str(checkpoint_dir)!r}."
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
            f"{status.mcse_max:.3f})"
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


def _place(model: AbstractModel, panel: PyTree, mesh: Mesh | None) -> tuple[PyTree, Mesh | None]:
    """Host data split over ``mesh`` (rows in blocks of units); placed data keeps its mesh.

    Without a mesh, host :class:`~hbjax.UnitRows` and other data go to the default device
    (summed plainly, not per block).
    """
    del model
    if isinstance(panel, AbstractHostData) and panel.mesh is None:
        return panel.place(mesh)
    placed_on = getattr(panel, "mesh", None)
    if placed_on is not None:
        return panel, placed_on
    if mesh is not None:
        raise TypeError(
            "fit(..., mesh=...) splits hbjax.UnitRows over the devices; got "
            f"{type(panel).__name__}. Put your data in hbjax.UnitRows (rows of whole units) "
            "and write the model as an hbjax.AbstractRowModel."
        )
    return jax.device_put(panel), None


def _sampler(
    model: AbstractModel,
    guide: AbstractGuide,
    panel: PyTree,
    batch_size: int | None,
    mesh: Mesh | None,
    key: PRNGKeyArray,
    steps: int,
    chunk_size: int,
) -> AbstractSampler:
    """The minibatch sampler of host data (or the one given), checked."""
    if isinstance(panel, AbstractSampler):  # a sampler of the user's own
        if batch_size is not None and batch_size != panel.batch_size:
            raise ValueError(
                f"batch_size {batch_size} differs from the sampler's ({panel.batch_size}); "
                "leave it out when passing a sampler."
            )
        stand_in = (np.zeros(1, np.float32),)  # for the argument checks
        _check_fit_arguments(model, guide, stand_in, steps, chunk_size)
        sampler = panel
    elif not isinstance(panel, AbstractHostData) or panel.mesh is not None:
        raise TypeError(
            "fit(..., batch_size=...) takes host hbjax.UnitRows (e.g. "
            "hbjax.counts.from_frame(...).rows), not placed ones: the full data stays on the "
            "host."
        )
    else:
        _check_fit_arguments(model, guide, panel, steps, chunk_size)
        sampler = None
    if not isinstance(model, AbstractUnitModel) or model.unit_leaves() is None:
        raise TypeError(
            f"{type(model).__name__} is not an hbjax.AbstractUnitModel declaring its unit "
            "latents (unit_leaves): it cannot be minibatched; fit it without batch_size."
        )
    check_minibatch_guide(guide)
    if sampler is None:
        panel.check_model(model)
        sampler = panel.sampler(batch_size, mesh, seed_from_key(key))
    return sampler
