"""Checkpoints of a fit: its whole state, the losses and the convergence trace.

One file, ``DIR/checkpoint.eqx``: a JSON header line (step, fingerprint, lengths, the
convergence status) followed by the leaves of a pytree of arrays (the
:class:`hbjax.vi.step.SVIState`, the losses, the key and the watched trace), written with
:func:`equinox.tree_serialise_leaves` (no pickle). It is written to a temporary file in
the same folder, flushed to disk and renamed over the old one: a kill at any moment
leaves the last complete checkpoint, and a SIGTERM or Ctrl-C that arrives during the write
is handled once the write is complete. The fingerprint must match on resume: the guide type,
the state's structure and shapes, the model (a hash of its arrays, options and priors),
the objective, and what the caller adds (:func:`hbjax.fit`'s ``fingerprint``: the data's
content hash, the optimiser's settings, ...); a checkpoint of another fit is refused,
naming what differs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np

FORMAT = "hbjax-checkpoint-3"
FILENAME = "checkpoint.eqx"


class CheckpointError(ValueError):
    """A checkpoint cannot be used for this fit; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class Checkpoints:
    """Where and how often :func:`hbjax.fit` saves its state, and whether it resumes.

    The fit's state (guide, optimiser state, step, average), the key, the losses and the
    convergence trace are saved every ``every`` steps, at the end, and at the last good
    step when a step goes non-finite. A folder that already holds a checkpoint is refused
    unless ``resume``.

    Args:
        directory: the folder (created if needed).
        every: steps between checkpoints (the fit's chunks are aligned to it).
        resume: continue from the checkpoint there (a folder without one is refused); with
            the same key and device count the result is the uninterrupted fit's, averaging
            and stopping included. A checkpoint of another model (its arrays, options and
            priors), objective, guide, state shape or key, or another ``fingerprint``, is
            refused, naming what differs.
        fingerprint: what else identifies the fit, which hbjax cannot read off its
            arguments (JSON-able values): the data's content (:func:`content_hash`), the
            optimiser's hyperparameters. Stored with the checkpoint; a resume with other
            values is refused. :func:`hbjax.counts.fit_counts` passes the rows' hash, the
            model's spec and its config.
    """

    directory: str | os.PathLike[str]
    every: int = 1000
    resume: bool = False
    fingerprint: Mapping[str, object] | None = None

    def __post_init__(self):
        every = self.every
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"Checkpoints(every=...) must be a positive int; got {every!r}.")
        if not isinstance(self.directory, str | os.PathLike):
            raise TypeError(f"Checkpoints needs a folder; got {self.directory!r}.")


def fingerprint(state: Any, guide_static: Any) -> dict[str, object]:
    """What a checkpoint must match of the state: guide type, every leaf's shape and dtype."""
    shapes = [
        f"{np.shape(x)}:{getattr(x, 'dtype', type(x).__name__)}" for x in jax.tree.leaves(state)
    ]
    return {
        "guide": type(guide_static).__name__,
        "state": shapes,
        "state_structure": str(jax.tree.structure(state)),
    }


_HASH_ITEMS = 1 << 22  # array entries hashed at once


def content_hash(tree: Any) -> str:
    """A short hash of a pytree's structure and the bytes of its leaves (arrays on the host).

    Python scalars and strings enter by ``repr``; the same tree gives the same hash on any
    machine with the same byte order. Needs every array fully on this process.
    """
    digest = hashlib.blake2b(str(jax.tree.structure(tree)).encode(), digest_size=16)
    for leaf in jax.tree.leaves(tree):
        if hasattr(leaf, "dtype") and hasattr(leaf, "shape"):
            array = np.asarray(leaf).reshape(-1)
            digest.update(f"{array.dtype}{np.shape(leaf)}".encode())
            for lo in range(0, array.size, _HASH_ITEMS):  # arrays on disk read in pieces
                digest.update(np.ascontiguousarray(array[lo : lo + _HASH_ITEMS]).tobytes())
        else:
            digest.update(repr(leaf).encode())
    return digest.hexdigest()


def describe(function: Any) -> str:
    """A callable in words for a fingerprint: its qualified name and any bound arguments."""
    if isinstance(function, functools.partial):
        bound = ", ".join(
            [repr(a) for a in function.args] + [f"{k}={v!r}" for k, v in function.keywords.items()]
        )
        return f"partial({describe(function.func)}, {bound})"
    if isinstance(function, eqx.Module):  # e.g. RenyiBound(alpha=0.0, num_particles=4, ...)
        return f"{type(function).__module__}.{function!r}"
    module = getattr(function, "__module__", type(function).__module__)
    name = getattr(function, "__qualname__", type(function).__qualname__)
    return f"{module}.{name}"


def path_in(directory: str | os.PathLike[str]) -> Path:
    """The checkpoint file of a checkpoint folder."""
    return Path(directory) / FILENAME


def save(directory: str | os.PathLike[str], *, tree: Any, header: dict[str, object]) -> Path:
    """Write ``header`` and the arrays of ``tree`` atomically (temporary file, fsync, rename).

    Raises:
        CheckpointError: the checkpoint could not be written (a full disk, no permission);
            the last one stays as it was.
    """
    folder = Path(directory)
    tmp = folder / f".{FILENAME}.{os.getpid()}.tmp"
    with _signals_deferred():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as handle:
                handle.write((json.dumps({"format": FORMAT, **header}) + "\n").encode())
                eqx.tree_serialise_leaves(handle, tree)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, folder / FILENAME)
        except OSError as exc:
            raise CheckpointError(
                f"cannot write the checkpoint in {str(folder)!r}: {exc.strerror or exc}; the "
                "last one is kept."
            ) from None
        finally:
            tmp.unlink(missing_ok=True)
    return folder / FILENAME


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGTERM and SIGINT until the block ends, then hand them to their own handlers.

    A handler that raises (the CLI's SIGTERM handler, Python's KeyboardInterrupt) would
    otherwise interrupt the serialisation half-way. Only the main thread can set handlers;
    elsewhere the block runs as is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    deferred = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.signal(s, lambda signum, _: arrived.append(signum)) for s in deferred}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        for signum in deferred:  # SIGTERM first: a scheduler's end outranks a Ctrl-C
            if signum in arrived:
                _deliver(signum, previous[signum])


def _deliver(signum: int, handler: Any) -> None:
    """Do what ``handler`` (as :func:`signal.getsignal` returns it) would have done."""
    if callable(handler):
        handler(signum, None)
    elif handler in (signal.SIG_DFL, None):
        os.kill(os.getpid(), signum)  # the default action (SIGTERM: exit), now unmasked


def load(
    directory: str | os.PathLike[str],
    *,
    like: Callable[[dict[str, Any]], Any],
    fingerprint: dict[str, object],
) -> tuple[dict[str, Any], Any]:
    """Read the checkpoint in ``directory``: its header and its tree.

    ``like(header)`` gives a tree of the saved structure and shapes (lengths that vary,
    such as the losses', are in the header). Every field of ``fingerprint`` must equal the
    header's.

    Raises:
        CheckpointError: no checkpoint, an unreadable one, or one of another model, data
            shape, guide or optimiser (the message names the difference).
    """
    path = path_in(directory)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint in {str(directory)!r} (looked for {FILENAME}).")
    with open(path, "rb") as handle:
        try:
            header = json.loads(handle.readline().decode())
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{str(path)!r} is not an hbjax checkpoint.") from None
        if header.get("format") != FORMAT:
            raise CheckpointError(
                f"{str(path)!r} has format {header.get('format')!r}; this hbjax reads {FORMAT!r}."
            )
        for field, expected in fingerprint.items():
            if header.get(field) != expected:
                raise CheckpointError(
                    f"the checkpoint in {str(directory)!r} is of another fit: its {field} is "
                    f"{_short(header.get(field))}, this fit's is {_short(expected)}. Resume "
                    "with the same data, model, guide and optimiser, or use a new folder."
                )
        try:
            tree = eqx.tree_deserialise_leaves(handle, like(header))
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
            raise CheckpointError(f"cannot read {str(path)!r}: {exc}") from None
    return header, tree


def _short(value: object, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def saved_step(directory: str | os.PathLike[str]) -> int | None:
    """The step of the checkpoint in ``directory``, or ``None`` if there is none."""
    path = path_in(directory)
    if not path.is_file():
        return None
    with open(path, "rb") as handle:
        try:
            return int(json.loads(handle.readline().decode())["step"])
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, ValueError):
            raise CheckpointError(f"{str(path)!r} is not an hbjax checkpoint.") from None


__all__ = [
    "Checkpoints",
    "CheckpointError",
    "content_hash",
    "describe",
    "fingerprint",
    "load",
    "save",
    "saved_step",
]
