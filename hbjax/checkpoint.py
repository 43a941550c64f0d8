"""Checkpoints of a fit: guide parameters, optimiser state, step, key and losses.

One file, ``DIR/checkpoint.eqx``: a JSON header line (step, fingerprint, format) followed by
the leaves of ``(params, opt_state, losses, key_data)`` written with
:func:`equinox.tree_serialise_leaves` (no pickle). It is written to a temporary file in the
same folder, flushed to disk and renamed over the old one: a kill at any moment leaves the
last complete checkpoint. The fingerprint (guide type, parameter and optimiser-state
structure and shapes, step count) must match on resume: a checkpoint of another model,
data shape or optimiser is refused with what differs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np

FORMAT = "hbjax-checkpoint-1"
FILENAME = "checkpoint.eqx"


class CheckpointError(ValueError):
    """A checkpoint cannot be used for this fit; the message says why and what to do."""


def fingerprint(params: Any, opt_state: Any, guide_static: Any) -> dict[str, object]:
    """What a checkpoint must match: guide type and every parameter/state leaf's shape."""

    def shapes(tree: Any) -> list[str]:
        return [
            f"{np.shape(x)}:{getattr(x, 'dtype', type(x).__name__)}" for x in jax.tree.leaves(tree)
        ]

    return {
        "guide": type(guide_static).__name__,
        "params": shapes(params),
        "params_structure": str(jax.tree.structure(params)),
        "opt_state": shapes(opt_state),
    }


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint (host arrays)."""

    step: int
    params: Any
    opt_state: Any
    losses: np.ndarray
    key_data: np.ndarray


def path_in(directory: str | os.PathLike[str]) -> Path:
    """The checkpoint file of a checkpoint folder."""
    return Path(directory) / FILENAME


def save(
    directory: str | os.PathLike[str],
    *,
    step: int,
    params: Any,
    opt_state: Any,
    losses: np.ndarray,
    key_data: np.ndarray,
    fingerprint: dict[str, object],
) -> Path:
    """Write a checkpoint atomically (temporary file, fsync, rename)."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    header = {"format": FORMAT, "step": int(step), "losses": len(losses), **fingerprint}
    tree = (params, opt_state, np.asarray(losses, np.float32), np.asarray(key_data))
    tmp = folder / f".{FILENAME}.{os.getpid()}.tmp"
    with open(tmp, "wb") as handle:
        handle.write((json.dumps(header) + "\n").encode())
        eqx.tree_serialise_leaves(handle, tree)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, folder / FILENAME)
    return folder / FILENAME


def load(
    directory: str | os.PathLike[str],
    *,
    like_params: Any,
    like_opt_state: Any,
    like_key_data: np.ndarray,
    fingerprint: dict[str, object],
) -> Checkpoint:
    """Read the checkpoint in ``directory``; refuse one that does not fit this fit.

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
        like = (
            like_params,
            like_opt_state,
            np.zeros(int(header["losses"]), np.float32),
            np.zeros_like(np.asarray(like_key_data)),
        )
        try:
            params, opt_state, losses, key_data = eqx.tree_deserialise_leaves(handle, like)
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
            raise CheckpointError(f"cannot read {str(path)!r}: {exc}") from None
    return Checkpoint(int(header["step"]), params, opt_state, np.asarray(losses), key_data)


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


__all__ = ["Checkpoint", "CheckpointError", "fingerprint", "load", "save", "saved_step"]
