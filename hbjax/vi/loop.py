"""The one fit loop: compiled chunks of :meth:`hbjax.vi.step.SVI.step`, small host-side pieces.

A chunk of steps runs under ``lax.scan``, compiled once ahead of time. Step ``s`` uses
``fold_in(key, s)``, so the chunk length never changes results (and a chunk run again
from its start, up to a non-finite step, gives the last good state).
Between chunks the host runs small pieces in turn: the record of losses and the
non-finite guard (:class:`_Log`), the convergence check (:class:`~hbjax.vi.convergence.Monitor`),
the user's callback, the checkpoint (:class:`Saver`) and the progress bar. Data comes
from a feed: the same placed panel every step (:class:`FullBatchFeed`) or chunks of
minibatches prepared on the host while the devices run (:class:`MinibatchFeed`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from .._types import PRNGKeyArray, PyTree, float_dtype
from . import checkpoint
from .convergence import Convergence, Monitor, Status, Watch
from .devices import replicate, to_host
from .guide import AbstractGuide
from .host import AbstractSampler
from .objectives import AbstractObjective
from .step import _TRUE, SVI, SVIState, start_averaging


class FullBatchFeed:
    """Every step sees the same (placed) data."""

    def __init__(self, data: PyTree):
        self.data = data

    def start(self, step: int, chunk: int) -> None:
        """Nothing to prepare."""

    def next(self, step: int, n: int, steps: int) -> None:
        """No per-step batches: the data is an argument of every chunk."""
        return None

    def close(self) -> None:
        """Nothing to release."""


class MinibatchFeed:
    """Chunks of a sampler's batches, the next drawn and sent while the current one runs."""

    def __init__(self, sampler: AbstractSampler):
        self.sampler, self.data = sampler, None
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self.upcoming: concurrent.futures.Future | None = None

    def start(self, step: int, chunk: int) -> None:
        """Begin drawing the first chunk (steps ``step .. step + chunk - 1``)."""
        self.chunk = chunk
        self.upcoming = self.pool.submit(self.sampler.batches, step, chunk)

    def peek(self) -> Any:
        """The first chunk (to compile against)."""
        return self.upcoming.result()

    def next(self, step: int, n: int, steps: int) -> Any:
        """The batches of steps ``step ..``; starts drawing the chunk after them."""
        batches = self.upcoming.result()
        if step + n < steps:
            self.upcoming = self.pool.submit(self.sampler.batches, step + n, self.chunk)
        return batches

    def close(self) -> None:
        """Stop the worker thread."""
        self.pool.shutdown(wait=True, cancel_futures=True)


class Saver:
    """Checkpoints of one fit (:mod:`hbjax.vi.checkpoint`); inert without a configuration."""

    def __init__(
        self,
        config: checkpoint.Checkpoints | None,
        key: PRNGKeyArray,
        identity: dict[str, object] | None = None,
    ):
        directory = None if config is None else config.directory
        self.every = 1 if config is None else config.every
        self.resume = config is not None and config.resume
        if directory is not None and not self.resume:
            _check_writable(directory)  # now, not after the first 1,000 steps
        self.directory = directory
        self.key_data = np.asarray(jax.random.key_data(key))
        # as the JSON header gives them back (tuples become lists)
        self.identity = json.loads(json.dumps(identity or {}, default=str))
        self.fingerprint: dict[str, object] = {}

    def restore(
        self, state: SVIState, steps: int, monitor: Monitor | None
    ) -> tuple[SVIState, np.ndarray]:
        """The starting state and losses: the checkpoint's when resuming from one."""
        no_losses = np.zeros(0, float_dtype())
        if self.directory is None:
            return state, no_losses
        arrays, static = eqx.partition(state, eqx.is_array)
        self.fingerprint = {**checkpoint.fingerprint(arrays, static.guide), **self.identity}
        step = checkpoint.saved_step(self.directory)
        if step is None:
            if self.resume:
                raise checkpoint.CheckpointError(
                    f"no checkpoint to resume in {str(self.directory)!r} (no "
                    f"{checkpoint.FILENAME}); check the folder's name, or drop --resume "
                    "(resume=False) to start a new fit there."
                )
            return state, no_losses
        if not self.resume:
            raise checkpoint.CheckpointError(
                f"{str(self.directory)!r} already holds a checkpoint (step {step}); pass "
                "resume=True (--resume) to continue it, or use another folder."
            )

        def like(header: dict[str, Any]) -> dict[str, Any]:
            rows, width = header["trace"]
            return {
                "state": arrays,
                "losses": np.zeros(header["losses"], float_dtype()),
                "key": np.zeros_like(self.key_data),
                "trace": np.zeros((rows, width), np.float32),
                "trace_steps": np.zeros(rows, np.int64),
            }

        header, saved = checkpoint.load(self.directory, like=like, fingerprint=self.fingerprint)
        if header["step"] > steps:
            raise checkpoint.CheckpointError(
                f"the checkpoint in {str(self.directory)!r} is at step {header['step']}, past "
                f"steps={steps}; ask for at least {header['step']} steps to continue it."
            )
        if not np.array_equal(saved["key"], self.key_data):
            raise checkpoint.CheckpointError(
                f"the checkpoint in {str(self.directory)!r} was written with another key "
                "(seed); resume with the same key to continue that fit."
            )
        if monitor is not None and header.get("status") is not None:
            monitor.restore(saved["trace"], saved["trace_steps"], header["status"])
        as_device = lambda x: jnp.asarray(x) if isinstance(x, np.ndarray | np.generic) else x  # noqa: E731
        return eqx.combine(jax.tree.map(as_device, saved["state"]), static), saved["losses"]

    def align(self, chunk: int) -> int:
        """A chunk length that divides the checkpoint interval."""
        return chunk if self.directory is None else math.gcd(chunk, self.every)

    def save(self, step: int, state: SVIState, losses: np.ndarray, monitor: Monitor | None) -> None:
        """Write the state after ``step`` steps."""
        arrays = jax.tree.map(np.asarray, to_host(eqx.filter(state, eqx.is_array)))
        trace = monitor.state() if monitor is not None else None
        rows = trace["rows"] if trace else np.zeros((0, 0), np.float32)
        checkpoint.save(
            self.directory,
            tree={
                "state": arrays,
                "losses": np.asarray(losses, float_dtype()),
                "key": self.key_data,
                "trace": rows,
                "trace_steps": trace["steps"] if trace else np.zeros(0, np.int64),
            },
            header={
                "step": int(step),
                "losses": len(losses),
                "trace": list(rows.shape),
                "status": monitor.status.to_dict() if monitor is not None else None,
                **self.fingerprint,
            },
        )

    def due(self, done: int, steps: int, *, stopping: bool) -> bool:
        """Whether to save after ``done`` steps."""
        if self.directory is None:
            return False
        return stopping or done % self.every == 0 or done == steps


def _check_writable(directory: str | os.PathLike[str]) -> None:
    """Create the checkpoint folder; a file there or no permission: one clear error."""
    folder = Path(directory)
    if folder.exists() and not folder.is_dir():
        raise checkpoint.CheckpointError(f"checkpoint folder {str(folder)!r} is a file.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise checkpoint.CheckpointError(
            f"cannot create the checkpoint folder {str(folder)!r}: {exc.strerror}."
        ) from None
    if not os.access(folder, os.W_OK):
        raise checkpoint.CheckpointError(
            f"cannot write checkpoints in {str(folder)!r} (permission denied)."
        )


@dataclasses.dataclass
class Outcome:
    """What :func:`run` returns to :func:`hbjax.fit`."""

    state: SVIState
    losses: np.ndarray
    first: int
    done: int
    failed_at: int | None
    status: Status | None
    compile_seconds: float
    loop_seconds: float
    callback_seconds: float
    chunk_seconds: np.ndarray
    num_traces: int


class _Log:
    """Losses, the first non-finite step, timings and the progress bar."""

    def __init__(
        self,
        steps: int,
        first: int,
        losses: np.ndarray,
        progress: bool,  # noqa: FBT001
        epoch: float | None,
    ):
        self.bar = tqdm(
            total=steps, initial=first, unit="it", disable=not progress, desc="hbjax fit"
        )
        self.losses, self.done, self.first = [losses], first, first
        self.failed_at: int | None = None
        self.steps_per_epoch = epoch
        self.chunk_seconds: list[float] = []
        self.paused = 0.0
        self.start = self.chunk_start = time.perf_counter()

    def record(self, losses: np.ndarray, finite: np.ndarray, n: int) -> int:
        """Take a chunk's first ``n`` steps; returns how many were good (all unless one failed)."""
        losses, finite = losses[:n], finite[:n]
        good = n if finite.all() else int(np.flatnonzero(~finite)[0])
        self.losses.append(losses[:good])
        if good < n:
            self.failed_at = self.done + good
            return good
        self.done += n
        self.chunk_seconds.append(time.perf_counter() - self.chunk_start)
        self.bar.update(n)
        return good

    def show(self, status: Status | None) -> None:
        """Loss, epoch and the convergence phase on the progress bar."""
        postfix = {"loss": f"{float(np.mean(self.losses[-1])):.6g}"}
        if self.steps_per_epoch is not None:
            postfix = {"epoch": f"{self.done / self.steps_per_epoch:.1f}", **postfix}
        if status is not None and status.average_from is not None:
            postfix["mcse"] = "…" if status.mcse is None else f"{status.mcse:.3f}"
        elif status is not None and status.rhat is not None:
            postfix["rhat"] = f"{status.rhat:.2f}"
        self.bar.set_postfix(postfix, refresh=False)

    def all_losses(self) -> np.ndarray:
        """Every step's loss so far (resumed ones included)."""
        return np.concatenate(self.losses)


def run(
    svi: SVI,
    state: SVIState,
    source: FullBatchFeed | MinibatchFeed,
    *,
    key: PRNGKeyArray,
    steps: int,
    chunk: int,
    mesh: Mesh | None,
    convergence: Convergence | None,
    check_every: int,
    min_average: int,
    saver: Saver,
    callback: Callable[[int, AbstractGuide], None] | None,
    progress: bool,
    steps_per_epoch: float | None = None,
) -> Outcome:
    """Run ``svi`` from ``state`` until ``steps`` steps, convergence or a non-finite step.

    ``chunk`` must divide ``check_every`` and the checkpoint interval (:func:`hbjax.fit`
    aligns it). Returns the last good state and what happened.
    """
    start = time.perf_counter()
    per_leaf = 1 if convergence is None else convergence.max_per_leaf
    watch = Watch(state.guide, per_leaf, svi.model.reported_leaves())
    monitor = None
    if convergence is not None:
        settle = svi.objective.settled_at if isinstance(svi.objective, AbstractObjective) else 0
        names = watch.names(state.guide)
        monitor = Monitor(
            convergence, min_average, n_means=watch.n_means, settle=settle, names=names
        )
    state, first_losses = saver.restore(state, steps, monitor)
    first = int(state.step)
    state_arrays, state_static = eqx.partition(state, eqx.is_array)
    svi_arrays, svi_static = eqx.partition(svi, eqx.is_array)
    put = (lambda x: replicate(x, mesh)) if mesh is not None else jax.device_put
    state_arrays, svi_arrays, key = put((state_arrays, svi_arrays, key))
    full, last = put((np.int32(chunk), np.int32((steps - first) % chunk or chunk)))
    traces, floats = 0, float_dtype()

    def run_chunk(state_arrays, svi_arrays, key, num_active, data, batches):  # noqa: ANN001, ANN202
        nonlocal traces
        traces += 1
        svi = eqx.combine(svi_arrays, svi_static)

        def body(arrays, xs):  # noqa: ANN001, ANN202
            i, batch = xs
            state = eqx.combine(arrays, state_static)
            new, info = svi.step(
                state, data if batch is None else batch, jax.random.fold_in(key, state.step)
            )
            active = i < num_active
            # computed and selected, never branched on: a lax.cond waits for the host on a
            # GPU. Only on `active`: selecting on `info.finite` (a chain over every leaf)
            # had XLA recompute that chain inside each leaf's update. A chunk with a
            # non-finite step is run again up to that step instead (`run`).
            arrays = jax.tree.map(
                lambda n, o: jnp.where(active, n, o), eqx.filter(new, eqx.is_array), arrays
            )
            loss = jnp.where(active, info.loss.astype(floats), jnp.asarray(jnp.nan, floats))
            finite = jnp.where(active, info.finite, _TRUE)
            watched = watch(new.guide)
            return arrays, (loss, finite, watched)

        arrays, (losses, finite, watched) = jax.lax.scan(
            body, state_arrays, (jnp.arange(chunk), batches)
        )
        scale = watch.scale(eqx.combine(arrays, state_static).guide)
        return arrays, losses, finite, watched, scale

    source.start(first, chunk)
    batches = source.peek() if isinstance(source, MinibatchFeed) else None
    # the state stays where it was placed (XLA would choose by propagation otherwise, and
    # could shard a replicated state); the records are replicated, for the host
    where = jax.tree.map(lambda x: x.sharding, state_arrays)
    record = NamedSharding(mesh, P()) if mesh is not None else jax.tree.leaves(where)[0]
    # not donated: a chunk's starting state is kept until it ends, to run it again up to a
    # non-finite step
    compiled = (
        jax.jit(run_chunk, out_shardings=(where, *[record] * 4))
        .lower(state_arrays, svi_arrays, key, full, source.data, batches)
        .compile()
    )
    compile_seconds = time.perf_counter() - start
    log = _Log(steps, first, first_losses, progress, steps_per_epoch)
    stop = monitor is not None and monitor.status.converged  # a checkpoint of a finished fit
    try:
        with jax.transfer_guard_host_to_device("disallow"):  # only explicit transfers
            while log.done < steps and not stop:
                n = min(chunk, steps - log.done)
                batches = source.next(log.done, n, steps)
                before, start_arrays = log.done, state_arrays
                state_arrays, losses, finite, watched, scale = compiled(
                    start_arrays,
                    svi_arrays,
                    key,
                    full if n == chunk else last,
                    source.data,
                    batches,
                )
                losses, finite, watched = jax.device_get(to_host((losses, finite, watched)))
                good = log.record(losses, finite, n)
                if good < n:  # the last good state: the chunk again, up to the bad step
                    with jax.transfer_guard_host_to_device("allow"):
                        count = put(np.int32(good))
                    state_arrays = compiled(
                        start_arrays, svi_arrays, key, count, source.data, batches
                    )[0]
                if monitor is not None:
                    monitor.record(watched[:good], before)
                if log.failed_at is not None:
                    stop = True
                elif monitor is not None and log.done % check_every == 0:
                    decision = monitor.check(log.done, np.asarray(jax.device_get(to_host(scale))))
                    if decision == "average":
                        # an explicit placement (on several processes, of every process's
                        # copy): the guard is there to catch implicit ones
                        with jax.transfer_guard_host_to_device("allow"):
                            begun = put(np.int32(log.done))
                        state_arrays = start_averaging(state_arrays, begun)
                    stop = decision == "stop"
                log.show(None if monitor is None else monitor.status)
                state = eqx.combine(state_arrays, state_static)
                if callback is not None and log.failed_at is None:
                    paused = time.perf_counter()
                    with jax.transfer_guard_host_to_device("allow"):  # the user's code
                        callback(log.done, jax.tree.map(np.asarray, to_host(svi.guide(state))))
                    log.paused += time.perf_counter() - paused
                if saver.due(log.done, steps, stopping=stop):
                    step = log.done if log.failed_at is None else log.failed_at
                    saver.save(step, state, log.all_losses(), monitor)
                log.chunk_start = time.perf_counter()
    finally:
        log.bar.close()
        source.close()
    loop_seconds = time.perf_counter() - log.start - log.paused
    return Outcome(
        state=to_host(eqx.combine(state_arrays, state_static)),
        losses=log.all_losses(),
        first=first,
        done=log.done,
        failed_at=log.failed_at,
        status=None if monitor is None else monitor.status,
        compile_seconds=compile_seconds,
        loop_seconds=loop_seconds,
        callback_seconds=log.paused,
        chunk_seconds=np.asarray(log.chunk_seconds),
        num_traces=traces,
    )


__all__ = ["FullBatchFeed", "MinibatchFeed", "Outcome", "Saver", "run"]
