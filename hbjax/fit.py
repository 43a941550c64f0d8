"""Fitting: an optax step jitted once, chunks of steps under ``lax.scan``, a progress bar.

:func:`make_step` builds one optimisation step (plain, un-jitted); :func:`fit` compiles a
chunk of steps once (ahead of time, with buffer donation), runs it until ``steps`` are
done, and returns a :class:`FitResult`. Step ``i`` uses ``fold_in(key, i)``, so results do
not depend on the chunk size.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from tqdm.auto import tqdm

from . import checkpoint
from ._types import PRNGKeyArray, PyTree, Scalar
from .data import Panel
from .diagnostics import ImportanceDiagnostics, importance_diagnostics
from .guide import AbstractGuide
from .minibatch import UnitBatch, UnitSampler, seed_from_key, units_in_batch
from .model import AbstractModel
from .objectives import renyi_elbo
from .sharding import make_mesh, replicate, shard_panel, to_host

#: A loss to minimise: ``objective(model, guide, panel, *, key) -> scalar``.
Objective = Callable[..., Scalar]


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
        guide: the fitted guide.
        losses: ``[steps]`` loss of each step (before its update).
        opt_state: the optimiser state after the last step.
        steps: steps done.
        wall_seconds: total time of the fit, compilation included.
        compile_seconds: time to trace and compile the step.
        iterations_per_second: steps per second after compilation.
        num_traces: times the step was traced (1: compiled once).
        chunk_seconds: wall time of each completed chunk of steps (for benchmarks).
        batch_size: units per step of a minibatch fit (``None``: full batch).
        epochs: passes over the units (``steps`` for a full-batch fit).
        diagnostics: PSIS k-hat and effective sample size of the fitted guide
            (:mod:`hbjax.diagnostics`), when ``fit(..., diagnostic_draws=S)`` asked for them.
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
    diagnostics: ImportanceDiagnostics | None = None

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


_TRUE = np.True_


def _all_finite(tree: Any) -> jax.Array:
    """Whether every inexact array in ``tree`` is finite (a scalar bool)."""
    arrays = jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
    return functools.reduce(jnp.logical_and, [jnp.all(jnp.isfinite(x)) for x in arrays], _TRUE)


def _place_on_default_device(data: PyTree) -> PyTree:
    """Copy host data to the default device, once, before the loop."""
    return jax.device_put(data)


def _typed_key(key: PRNGKeyArray) -> PRNGKeyArray:
    """A new-style typed key (legacy ``uint32[2]`` keys are wrapped)."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(key)


def make_step(
    objective: Objective, optimizer: optax.GradientTransformation
) -> Callable[..., tuple[AbstractGuide, Any, Scalar, jax.Array]]:
    """One optimisation step of ``objective`` with ``optimizer``.

    The step maps ``(guide, opt_state, model, panel, key)`` to
    ``(guide, opt_state, loss, finite)``, where ``finite`` says whether the loss, every
    gradient and every updated parameter are finite. Not jitted: compose or jit it as you
    like (:func:`fit` jits it once inside a ``lax.scan``).
    """

    def step(
        guide: AbstractGuide,
        opt_state: Any,
        model: AbstractModel,
        panel: PyTree,
        key: PRNGKeyArray,
    ) -> tuple[AbstractGuide, Any, Scalar, jax.Array]:
        def loss_fn(g: AbstractGuide) -> Scalar:
            return objective(model, g, panel, key=key)

        loss, grads = eqx.filter_value_and_grad(loss_fn)(guide)
        params = eqx.filter(guide, eqx.is_inexact_array)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        guide = eqx.apply_updates(guide, updates)
        finite = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(guide)
        return guide, opt_state, loss, finite

    return step


def _guarded_step(
    step: Callable[..., tuple[AbstractGuide, Any, Scalar, jax.Array]],
    guide_static: Any,
    model: AbstractModel,
    key: PRNGKeyArray,
    first_step: jax.Array,
    num_active: jax.Array,
    carry: tuple[Any, Any, jax.Array],
    i: jax.Array,
    data: PyTree,
) -> tuple[tuple[Any, Any, jax.Array], tuple[jax.Array, jax.Array]]:
    """Step ``i`` of a scanned chunk (both fit loops): carry and ``(loss, finite)``.

    The new state is kept only if the step counts: it is one of the chunk's active steps
    (``i < num_active``; the last chunk of a fit may be shorter), no earlier step of the
    chunk was non-finite (the carried ``ok``), and its own loss, gradients and parameters
    are finite. The step is always computed and the result selected (``jnp.where``), never
    branched on with ``lax.cond``: on a GPU a conditional copies its predicate to the host
    and waits, once per step. Steps that do not count report a NaN loss and
    ``finite = True`` (they are not failures). Step ``i`` uses ``fold_in(key, first_step + i)``.
    """
    params, opt_state, ok = carry
    guide = eqx.combine(params, guide_static)
    step_key = jax.random.fold_in(key, first_step + i)
    guide, new_state, loss, finite = step(guide, opt_state, model, data, step_key)
    new_params = eqx.filter(guide, eqx.is_inexact_array)
    active = (i < num_active) & ok
    take = active & finite
    keep = lambda new, old: jnp.where(take, new, old)  # noqa: E731
    params = jax.tree.map(keep, new_params, params)
    opt_state = jax.tree.map(keep, new_state, opt_state)
    loss = jnp.where(active, loss.astype(jnp.float32), jnp.float32(jnp.nan))
    finite = jnp.where(active, finite, _TRUE)
    return (params, opt_state, ok & finite), (loss, finite)


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
            "panel must be an hbjax Panel (from hbjax.from_frame) or a pytree of arrays for a "
            f"model of your own; got {type(panel).__name__}."
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
    diagnostic_draws: int = 0,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 1000,
    resume: bool = False,
) -> FitResult:
    """Fit ``guide`` to the posterior of ``model`` given ``panel`` by stochastic optimisation.

    Args:
        model: the model.
        guide: the starting guide (e.g. ``MeanFieldNormal.from_shapes(...)``).
        panel: the data (host or device arrays).
        key: PRNG key; step ``i`` uses ``jax.random.fold_in(key, i)``.
        steps: number of optimisation steps.
        optimizer: any ``optax.GradientTransformation``; default :func:`default_optimizer`.
        objective: ``(model, guide, panel, *, key) -> loss``; default
            :func:`hbjax.renyi_elbo` (alpha=0, 4 particles).
        chunk_size: steps per compiled ``lax.scan`` call (the progress bar's granularity).
        progress: show a tqdm progress bar with iterations/s and the running loss.
        mesh: split a host panel over this mesh (:func:`hbjax.make_mesh`; default: one
            device) with :func:`hbjax.shard_panel`, in the model's ``panel_layout()``; a panel
            already placed keeps its mesh and layout. Parameters are replicated; the result
            does not depend on the number of devices.
        callback: called after each chunk as ``callback(steps_done, guide)`` with a host
            copy of the guide (e.g. to track recovery); its time is not counted in the
            fit's timings.
        batch_size: minibatch SVI, units per step (see :mod:`hbjax.minibatch`). Each step
            draws units in every block of the sharding plan (rounded up to a multiple of the
            block count, itself a multiple of the device count; the result reports it),
            weights them so that log weights are unbiased, and updates the drawn units'
            guide parameters and every shared one; the optimiser state of units not drawn
            is left as it was (lazy Adam). ``panel`` must be a host :class:`~hbjax.Panel`
            (or a :class:`hbjax.minibatch.UnitSampler`, e.g. a memory-mapped grid from
            ``UnitSampler.load``, with ``batch_size`` left out): it stays on the host and
            chunks of batches go to the devices, each prepared while the previous one
            runs. The default optimiser's decay is then per epoch (``transition_steps =
            1000 x steps per epoch``).
        diagnostic_draws: after fitting, draw this many latents from the guide and report
            the PSIS k-hat and effective sample size of their importance weights
            (``result.diagnostics``, :func:`hbjax.diagnostics.importance_diagnostics`);
            0 (the default) skips it. Full-batch fits only: the weights need the whole
            likelihood.
        checkpoint_dir: save the guide's parameters, the optimiser state, the step, the key
            and the losses there every ``checkpoint_every`` steps, at the end, and at the
            last good step when a step goes non-finite (:mod:`hbjax.checkpoint`: Equinox
            serialisation, written atomically). A folder that already holds a checkpoint
            is refused unless ``resume``.
        checkpoint_every: steps between checkpoints (chunks are aligned to it).
        resume: continue from the checkpoint in ``checkpoint_dir`` (if there is one) up to
            ``steps`` in all; with the same key and device count the result is the one of
            the uninterrupted fit. A checkpoint of another model, data shape, guide,
            optimiser or key is refused.

    Returns:
        A :class:`FitResult`.

    Raises:
        NonFiniteLossError: a step's loss or gradient was NaN/inf (names the step; the
            error's ``result`` holds the last good guide, also saved with checkpoint_dir).
        hbjax.checkpoint.CheckpointError: a checkpoint that cannot be used (see above).

    Example:
        >>> import jax, hbjax
        >>> sim = hbjax.simulate(n_units=30, n_periods=10, n_groups=3)
        >>> panel, encoding = hbjax.from_frame(sim.frame)
        >>> model = hbjax.ElasticityModel.from_panel(panel)
        >>> guide = hbjax.MeanFieldNormal.from_shapes(
        ...     model.latent_shapes(), loc=model.init_latents(panel))
        >>> result = hbjax.fit(model, guide, panel, key=jax.random.key(0), steps=50,
        ...                    progress=False)
        >>> result.losses.shape
        (50,)
    """
    chunk_size = min(chunk_size, steps) if isinstance(steps, int) and steps > 0 else chunk_size
    if isinstance(diagnostic_draws, bool) or not isinstance(diagnostic_draws, int):
        raise TypeError(f"diagnostic_draws must be an int; got {diagnostic_draws!r}.")
    if diagnostic_draws != 0 and diagnostic_draws < 10:
        raise ValueError(f"diagnostic_draws must be 0 (off) or >= 10; got {diagnostic_draws}.")
    if isinstance(panel, UnitSampler) or batch_size is not None:
        if diagnostic_draws:
            raise ValueError(
                "diagnostic_draws needs the full likelihood and is not available with "
                "batch_size; compute them on a subsample of units with "
                "hbjax.diagnostics.importance_diagnostics."
            )
        return _fit_minibatch(
            model,
            guide,
            panel,
            key=key,
            steps=steps,
            batch_size=batch_size,
            optimizer=optimizer,
            objective=objective,
            chunk_size=chunk_size,
            progress=progress,
            mesh=mesh,
            callback=callback,
            checkpoints=(checkpoint_dir, checkpoint_every, resume),
        )
    _check_fit_arguments(model, guide, panel, steps, chunk_size)
    optimizer = default_optimizer() if optimizer is None else optimizer
    objective = renyi_elbo if objective is None else objective
    start = time.perf_counter()

    params, guide_static = eqx.partition(guide, eqx.is_inexact_array)
    params = jax.tree.map(jnp.copy, params)  # the step donates its buffers; keep the caller's
    model_arrays, model_static = eqx.partition(model, eqx.is_array)
    opt_state = optimizer.init(params)
    key = _typed_key(key)
    saver = _Checkpointer(checkpoint_dir, checkpoint_every, resume, key, guide_static)
    params, opt_state, first = saver.restore(params, opt_state, steps)
    chunk_size = saver.align(chunk_size)
    diagnostics_key = jax.random.fold_in(key, np.iinfo(np.int32).max)
    mesh_of = lambda data: getattr(data, "mesh", None)  # noqa: E731
    if isinstance(panel, Panel) and panel.mesh is None:  # a host panel: the fast layout
        mesh = mesh if mesh is not None else make_mesh(1)
        panel = shard_panel(panel, mesh, layout=model.panel_layout())
    elif mesh is not None and mesh_of(panel) is None:
        raise TypeError("fit(..., mesh=...) shards an hbjax Panel; got custom data.")
    if mesh_of(panel) is not None:  # parameters replicated on the panel's mesh
        params, opt_state, model_arrays, key = replicate(
            (params, opt_state, model_arrays, key), panel.mesh
        )
    else:
        panel = _place_on_default_device(panel)
    step = make_step(objective, optimizer)
    traces = 0

    def run_chunk(params, opt_state, first_step, num_active, key, model_arrays, panel):  # noqa: ANN001, ANN202
        nonlocal traces
        traces += 1
        model = eqx.combine(model_arrays, model_static)

        def body(carry, i):  # noqa: ANN001, ANN202
            return _guarded_step(
                step, guide_static, model, key, first_step, num_active, carry, i, panel
            )

        (params, opt_state, _), (losses, finite) = jax.lax.scan(
            body, (params, opt_state, _TRUE), jnp.arange(chunk_size)
        )
        return params, opt_state, losses, finite, first_step + num_active

    def on_devices(value: int) -> jax.Array:
        scalar = np.int32(value)
        return replicate(scalar, panel.mesh) if mesh_of(panel) else jax.device_put(scalar)

    first_step, full_chunk = on_devices(first.step), on_devices(chunk_size)
    last_chunk = on_devices((steps - first.step) % chunk_size or chunk_size)
    args = (params, opt_state, first_step, full_chunk, key, model_arrays, panel)
    compiled = jax.jit(run_chunk, donate_argnums=(0, 1)).lower(*args).compile()
    compile_seconds = time.perf_counter() - start

    log = _ChunkLog(steps, progress, guide_static, callback, first=first)
    try:
        # Everything the loop needs is on the devices already: nothing goes up in it.
        with jax.transfer_guard_host_to_device("disallow"):
            while log.done < steps:
                n = min(chunk_size, steps - log.done)
                active = full_chunk if n == chunk_size else last_chunk
                params, opt_state, chunk_losses, finite, first_step = compiled(
                    params, opt_state, first_step, active, key, model_arrays, panel
                )
                healthy = log.record(chunk_losses, finite, n, params)
                saver.after_chunk(log, steps, params, opt_state)
                if not healthy:
                    break
    finally:
        log.bar.close()
    result = log.result(model, params, opt_state, start, compile_seconds, traces, saver=saver)
    if diagnostic_draws:
        guide = eqx.combine(params, guide_static)  # still on the panel's devices
        diagnostics = importance_diagnostics(
            eqx.combine(model_arrays, model_static),
            guide,
            panel,
            key=replicate(diagnostics_key, panel.mesh) if mesh_of(panel) else diagnostics_key,
            num_draws=diagnostic_draws,
        )
        result = dataclasses.replace(result, diagnostics=diagnostics)
    return result


class _ChunkLog:
    """Host-side bookkeeping shared by both fit loops.

    Losses, the first bad step, the progress bar, the user's callback and the timings;
    builds the :class:`FitResult`.
    """

    def __init__(
        self,
        steps: int,
        progress: bool,  # noqa: FBT001
        guide_static: Any,
        callback: Callable[[int, AbstractGuide], None] | None,
        steps_per_epoch: float | None = None,
        *,
        first: _Resumed,
    ):
        self.bar = tqdm(
            total=steps,
            initial=first.step,
            unit="it",
            disable=not progress,
            desc="hbjax fit",
            leave=True,
        )
        self.guide_static, self.callback, self.steps_per_epoch = (
            guide_static,
            callback,
            steps_per_epoch,
        )
        self.losses: list[np.ndarray] = [first.losses]
        self.chunk_seconds: list[float] = []
        self.first = first.step
        self.callback_seconds, self.failed_at, self.done = 0.0, None, first.step
        self.loop_start = self.chunk_start = time.perf_counter()

    def record(self, chunk_losses: jax.Array, finite: jax.Array, n: int, params: Any) -> bool:
        """Take a chunk's first ``n`` losses; ``False`` when a step was non-finite (stop)."""
        chunk_losses = np.asarray(to_host(chunk_losses))[:n]
        finite = np.asarray(to_host(finite))[:n]
        if not finite.all():
            bad = int(np.flatnonzero(~finite)[0])
            self.losses.append(chunk_losses[:bad])
            self.failed_at = self.done + bad
            return False
        self.losses.append(chunk_losses)
        self.done += n
        self.chunk_seconds.append(time.perf_counter() - self.chunk_start)
        self.bar.update(n)
        postfix = {"loss": f"{float(np.mean(chunk_losses)):.6g}"}
        if self.steps_per_epoch is not None:
            postfix = {"epoch": f"{self.done / self.steps_per_epoch:.1f}", **postfix}
        self.bar.set_postfix(postfix, refresh=False)
        if self.callback is not None:
            waited = time.perf_counter()
            host_params = jax.tree.map(np.asarray, to_host(params))
            with jax.transfer_guard_host_to_device("allow"):  # the user's code
                self.callback(self.done, eqx.combine(host_params, self.guide_static))
            self.callback_seconds += time.perf_counter() - waited
        self.chunk_start = time.perf_counter()
        return True

    def result(
        self,
        model: AbstractModel,
        params: Any,
        opt_state: Any,
        start: float,
        compile_seconds: float,
        traces: int,
        batch_size: int | None = None,
        saver: _Checkpointer | None = None,
    ) -> FitResult:
        """The :class:`FitResult`; raises :class:`NonFiniteLossError` after a bad step."""
        loop_seconds = time.perf_counter() - self.loop_start - self.callback_seconds
        done = self.done if self.failed_at is None else self.failed_at
        new_steps = done - self.first
        params, opt_state = to_host((params, opt_state))
        result = FitResult(
            model=to_host(model),  # a model built from a placed panel holds replicated arrays
            guide=eqx.combine(params, self.guide_static),
            losses=np.concatenate(self.losses) if self.losses else np.zeros(0, np.float32),
            opt_state=opt_state,
            steps=done,
            wall_seconds=time.perf_counter() - start - self.callback_seconds,
            compile_seconds=compile_seconds,
            iterations_per_second=new_steps / loop_seconds if loop_seconds > 0 else math.inf,
            num_traces=traces,
            chunk_seconds=np.asarray(self.chunk_seconds),
            batch_size=batch_size,
            epochs=None if self.steps_per_epoch is None else done / self.steps_per_epoch,
        )
        if self.failed_at is not None:
            message = _non_finite_message(self.failed_at)
            if saver is not None and saver.directory is not None:
                message += f" The last good state is saved in {str(saver.directory)!r}."
            raise NonFiniteLossError(message, step=self.failed_at, result=result)
        return result

    def all_losses(self) -> np.ndarray:
        """The losses of every step done so far (resumed ones included)."""
        return np.concatenate(self.losses)


@dataclasses.dataclass(frozen=True)
class _Resumed:
    """Where a fit starts: step 0, or a checkpoint's step and losses."""

    step: int = 0
    losses: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.float32))


class _Checkpointer:
    """Checkpoints of one fit (:mod:`hbjax.checkpoint`); inert without a directory."""

    def __init__(
        self,
        directory: str | os.PathLike[str] | None,
        every: int,
        resume: bool,  # noqa: FBT001
        key: PRNGKeyArray,
        guide_static: Any,
    ):
        if directory is not None and (
            isinstance(every, bool) or not isinstance(every, int) or every < 1
        ):
            raise ValueError(f"checkpoint_every must be a positive int; got {every!r}.")
        if resume and directory is None:
            raise ValueError("resume=True needs checkpoint_dir (where the checkpoint is).")
        self.directory, self.every, self.resume = directory, every, resume
        self.key_data = np.asarray(jax.random.key_data(key))
        self.guide_static = guide_static
        self.fingerprint: dict[str, object] = {}

    def restore(self, params: Any, opt_state: Any, steps: int) -> tuple[Any, Any, _Resumed]:
        """The starting state: the checkpoint's when resuming from one, else the given."""
        if self.directory is None:
            return params, opt_state, _Resumed()
        self.fingerprint = checkpoint.fingerprint(params, opt_state, self.guide_static)
        step = checkpoint.saved_step(self.directory)
        if step is None:
            return params, opt_state, _Resumed()
        if not self.resume:
            raise checkpoint.CheckpointError(
                f"{str(self.directory)!r} already holds a checkpoint (step {step}); pass "
                "resume=True (--resume) to continue it, or use another folder."
            )
        saved = checkpoint.load(
            self.directory,
            like_params=params,
            like_opt_state=opt_state,
            like_key_data=self.key_data,
            fingerprint=self.fingerprint,
        )
        if saved.step > steps:
            raise checkpoint.CheckpointError(
                f"the checkpoint in {str(self.directory)!r} is at step {saved.step}, past "
                f"steps={steps}; ask for at least {saved.step} steps to continue it."
            )
        if not np.array_equal(saved.key_data, self.key_data):
            raise checkpoint.CheckpointError(
                f"the checkpoint in {str(self.directory)!r} was written with another key "
                "(seed); resume with the same key to continue that fit."
            )
        as_device = lambda x: jnp.asarray(x) if isinstance(x, np.ndarray | np.generic) else x  # noqa: E731
        params = jax.tree.map(as_device, saved.params)
        opt_state = jax.tree.map(as_device, saved.opt_state)
        return params, opt_state, _Resumed(saved.step, saved.losses)

    def align(self, chunk: int) -> int:
        """A chunk length that divides the checkpoint interval."""
        return chunk if self.directory is None else math.gcd(chunk, self.every)

    def after_chunk(self, log: _ChunkLog, steps: int, params: Any, opt_state: Any) -> None:
        """Save on the interval, at the end, and at the last good step after a bad one."""
        if self.directory is None:
            return
        failed = log.failed_at is not None
        if not (failed or log.done % self.every == 0 or log.done == steps):
            return
        host_params, host_state = jax.tree.map(np.asarray, to_host((params, opt_state)))
        checkpoint.save(
            self.directory,
            step=log.failed_at if failed else log.done,
            params=host_params,
            opt_state=host_state,
            losses=log.all_losses(),
            key_data=self.key_data,
            fingerprint=self.fingerprint,
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


def _masked_step(
    objective: Objective,
    optimizer: optax.GradientTransformation,
    unit_leaves: PyTree[bool],
) -> Callable[..., tuple[AbstractGuide, Any, Scalar, jax.Array]]:
    """A minibatch step: only the batch's units and the shared latents move.

    Updates of units outside the batch are zeroed and their optimiser state is kept as it
    was (lazy Adam: no stale momentum moves them); shared latents update every step.
    """

    def step(
        guide: AbstractGuide, opt_state: Any, model: AbstractModel, batch: UnitBatch, key: Any
    ) -> tuple[AbstractGuide, Any, Scalar, jax.Array]:
        loss, grads = eqx.filter_value_and_grad(lambda g: objective(model, g, batch, key=key))(
            guide
        )
        params = eqx.filter(guide, eqx.is_inexact_array)
        updates, new_state = optimizer.update(grads, opt_state, params)
        mask = guide.unit_update_mask(units_in_batch(batch), unit_leaves)
        updates = jax.tree.map(lambda u, m: jnp.where(m, u, 0.0), updates, mask)
        state_mask = optax.tree_utils.tree_map_params(
            optimizer,
            lambda _, m: m,
            opt_state,
            mask,
            transform_non_params=lambda v: jax.tree.map(lambda _: _TRUE, v),
        )
        new_state = jax.tree.map(
            lambda m, new, old: jnp.where(m, new, old), state_mask, new_state, opt_state
        )
        guide = eqx.apply_updates(guide, updates)
        finite = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(guide)
        return guide, new_state, loss, finite

    return step


def _fit_minibatch(
    model: AbstractModel,
    guide: AbstractGuide,
    panel: PyTree,
    *,
    key: PRNGKeyArray,
    steps: int,
    batch_size: int | None,
    optimizer: optax.GradientTransformation | None,
    objective: Objective | None,
    chunk_size: int,
    progress: bool,
    mesh: Mesh | None,
    callback: Callable[[int, AbstractGuide], None] | None,
    checkpoints: tuple[str | os.PathLike[str] | None, int, bool],
) -> FitResult:
    """:func:`fit` with ``batch_size``: chunks of batches scanned on device, prefetched.

    A chunk of ``S`` steps' batches (``S = min(chunk_size, steps per epoch / 4, 64 MiB /
    bytes per batch)``, at least 1) goes to the devices as one stacked array;
    while the devices scan over it, a worker thread draws and sends the next chunk.
    """
    start = time.perf_counter()
    sampler = None
    if isinstance(panel, UnitSampler):  # e.g. UnitSampler.load: a memory-mapped grid
        sampler = panel
        if batch_size is not None and batch_size != sampler.batch_size:
            raise ValueError(
                f"batch_size {batch_size} differs from the sampler's ({sampler.batch_size}); "
                "leave it out when passing a UnitSampler."
            )
        panel = (np.zeros(1, np.float32),)  # stands in for the data in the checks below
    elif not isinstance(panel, Panel) or panel.mesh is not None:
        raise TypeError(
            "fit(..., batch_size=...) takes a host Panel (from hbjax.from_frame or "
            "read_process_panel), not a placed one: the full panel stays on the host."
        )
    _check_fit_arguments(model, guide, panel, steps, chunk_size)
    unit_leaves = model.unit_leaves()
    if unit_leaves is None:
        raise TypeError(
            f"{type(model).__name__} does not declare unit_leaves(): it cannot be minibatched; "
            "fit it without batch_size."
        )
    key = _typed_key(key)
    if sampler is None:
        sampler = UnitSampler(panel, batch_size, mesh=mesh, seed=seed_from_key(key))
    per_step = sampler.batch_size * (sampler.n_periods * 9 + 16)  # bytes of one batch
    chunk = max(1, min(chunk_size, int(sampler.steps_per_epoch // 4), _CHUNK_BYTES // per_step))
    if optimizer is None:
        optimizer = default_optimizer(transition_steps=round(1000 * sampler.steps_per_epoch))
    objective = renyi_elbo if objective is None else objective
    params, guide_static = eqx.partition(guide, eqx.is_inexact_array)
    params = jax.tree.map(jnp.copy, params)
    model_arrays, model_static = eqx.partition(model, eqx.is_array)
    opt_state = optimizer.init(params)
    saver = _Checkpointer(*checkpoints, key, guide_static)
    params, opt_state, first = saver.restore(params, opt_state, steps)
    chunk = saver.align(chunk)
    params, opt_state, model_arrays, key, first_step, healthy = replicate(
        (params, opt_state, model_arrays, key, np.int32(first.step), _TRUE), sampler.mesh
    )
    full_chunk, last_chunk = replicate(
        (np.int32(chunk), np.int32((steps - first.step) % chunk or chunk)), sampler.mesh
    )
    step = _masked_step(objective, optimizer, unit_leaves)
    traces = 0

    def run_chunk(params, opt_state, first_step, num_active, healthy, key, model_arrays, batches):  # noqa: ANN001, ANN202, E501
        nonlocal traces
        traces += 1
        model = eqx.combine(model_arrays, model_static)

        def body(carry, xs):  # noqa: ANN001, ANN202
            i, batch = xs
            return _guarded_step(
                step, guide_static, model, key, first_step, num_active, carry, i, batch
            )

        (params, opt_state, healthy), (losses, finite) = jax.lax.scan(
            body, (params, opt_state, healthy), (jnp.arange(chunk), batches)
        )
        return params, opt_state, first_step + num_active, healthy, losses, finite

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        upcoming = pool.submit(sampler.batches, first.step, chunk)
        args = (params, opt_state, first_step, full_chunk, healthy, key, model_arrays)
        compiled = (
            jax.jit(run_chunk, donate_argnums=(0, 1)).lower(*args, upcoming.result()).compile()
        )
        compile_seconds = time.perf_counter() - start
        log = _ChunkLog(
            steps, progress, guide_static, callback, sampler.steps_per_epoch, first=first
        )
        with jax.transfer_guard_host_to_device("disallow"):  # batches go up explicitly
            while log.done < steps:
                n = min(chunk, steps - log.done)
                batches = upcoming.result()
                if log.done + n < steps:  # the next chunk is drawn and sent while this one runs
                    upcoming = pool.submit(sampler.batches, log.done + n, chunk)
                active = full_chunk if n == chunk else last_chunk
                params, opt_state, first_step, healthy, chunk_losses, finite = compiled(
                    params, opt_state, first_step, active, healthy, key, model_arrays, batches
                )
                ok = log.record(chunk_losses, finite, n, params)
                saver.after_chunk(log, steps, params, opt_state)
                if not ok:
                    break
        log.bar.close()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return log.result(
        model,
        params,
        opt_state,
        start,
        compile_seconds,
        traces,
        batch_size=sampler.batch_size,
        saver=saver,
    )
