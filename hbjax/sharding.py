"""Meshes, placement of panels and parameters on devices, and many hosts.

The mesh has one axis, ``"data"``. A panel's observation rows are split into one block per
device, **whole units per block** (a unit's rows never straddle two devices), each block
padded to a common length with zero-weight rows that point at one of the block's own units
(never a sentinel index). Observation arrays are placed with
``NamedSharding(mesh, P("data"))``; parameters and small arrays are replicated
(``P()``). Many hosts go through ``jax.distributed`` (with gloo collectives on CPU); each
process builds only its part of the global arrays
(``jax.make_array_from_process_local_data``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ._types import PyTree
from .data import Panel

#: The mesh axis along which observation rows are split.
DATA_AXIS = "data"

_OBS_FIELDS = ("unit_idx", "cell_idx", "log_price", "counts", "weight")


class ShardingError(ValueError):
    """A device or multi-host configuration that cannot work; the message says the fix."""


def make_mesh(devices: int | Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis (``"data"``) mesh over ``devices``.

    Args:
        devices: ``None`` for all devices (of every process), a number ``n`` for the
            first ``n``, or the devices themselves.

    Raises:
        ShardingError: more devices asked for than exist.
    """
    available = jax.devices()
    if devices is None:
        chosen = available
    elif isinstance(devices, int) and not isinstance(devices, bool):
        if not 1 <= devices <= len(available):
            raise ShardingError(
                f"asked for {devices} devices but {len(available)} "
                f"{jax.default_backend()} device(s) exist; use --devices 1..{len(available)} "
                "or 'all' (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N "
                "before starting Python gives N virtual devices)."
            )
        chosen = available[:devices]
    else:
        chosen = list(devices)
        if not chosen:
            raise ShardingError("the device list is empty.")
    return jax.make_mesh((len(chosen),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=chosen)


def _local_devices(mesh: Mesh) -> list[jax.Device]:
    """This process's devices, in mesh order."""
    return [d for d in mesh.devices.flat if d.process_index == jax.process_index()]


def balanced_unit_blocks(unit_idx: np.ndarray, n_blocks: int) -> np.ndarray:
    """Row boundaries splitting unit-sorted rows into ``n_blocks`` blocks of whole units.

    Args:
        unit_idx: ``[obs]`` unit of each row, sorted (a unit's rows are contiguous).
        n_blocks: number of blocks.

    Returns:
        ``[n_blocks + 1]`` row offsets; block ``b`` is rows ``[out[b], out[b + 1])``. Cuts
        fall on the unit boundary nearest to an equal split of the rows.
    """
    n_rows = len(unit_idx)
    starts = np.flatnonzero(np.r_[True, unit_idx[1:] != unit_idx[:-1]]) if n_rows else np.zeros(0)
    starts = np.r_[starts, n_rows].astype(np.int64)
    targets = np.arange(1, n_blocks) * n_rows / n_blocks
    right = np.clip(np.searchsorted(starts, targets), 0, len(starts) - 1)
    left = np.clip(right - 1, 0, len(starts) - 1)
    nearest = np.where(targets - starts[left] <= starts[right] - targets, left, right)
    cuts = np.maximum.accumulate(starts[nearest]) if n_blocks > 1 else np.zeros(0, np.int64)
    return np.r_[0, cuts, n_rows].astype(np.int64)


def _padded_blocks(panel: Panel, n_blocks: int, length: int | None = None) -> dict[str, np.ndarray]:
    """Observation arrays as ``n_blocks`` whole-unit blocks, each padded to one length."""
    host = {name: np.asarray(getattr(panel, name)) for name in _OBS_FIELDS}
    bounds = balanced_unit_blocks(host["unit_idx"], n_blocks)
    sizes = np.diff(bounds)
    length = int(max(sizes.max(initial=0), 1)) if length is None else length
    out = {name: np.zeros(n_blocks * length, host[name].dtype) for name in _OBS_FIELDS}
    for b in range(n_blocks):
        lo, hi = bounds[b], bounds[b + 1]
        at = b * length
        for name in _OBS_FIELDS:
            out[name][at : at + hi - lo] = host[name][lo:hi]
        # padding rows: zero weight, a valid index of a unit of this block
        out["unit_idx"][at + hi - lo : at + length] = host["unit_idx"][hi - 1] if hi > lo else 0
    return out


def block_length(panel: Panel, n_blocks: int) -> int:
    """Rows per block (the longest whole-unit block) for this process's panel."""
    sizes = np.diff(balanced_unit_blocks(np.asarray(panel.unit_idx), n_blocks))
    return int(max(sizes.max(initial=0), 1))


def shard_panel(panel: Panel, mesh: Mesh) -> Panel:
    """Pad and place a panel on a mesh, whole units per device.

    Observation rows are split on ``"data"``; the unit → group map is replicated.

    With several processes, ``panel`` holds this process's rows (see
    :func:`hbjax.sharding.process_unit_range`) and every process calls this together.

    Returns:
        A :class:`~hbjax.Panel` of global device arrays that remembers its mesh.
    """
    local = _local_devices(mesh)
    length = block_length(panel, len(local))
    if jax.process_count() > 1:  # every block must have the same length on every host
        length = int(np.max(multihost_utils.process_allgather(np.int64(length))))
    blocks = _padded_blocks(panel, len(local), length)
    rows = NamedSharding(mesh, P(DATA_AXIS))
    global_shape = (mesh.devices.size * length,)
    placed = {
        name: jax.make_array_from_process_local_data(rows, blocks[name], global_shape)
        for name in _OBS_FIELDS
    }
    return dataclasses.replace(
        panel, unit_group=replicate(np.asarray(panel.unit_group), mesh), mesh=mesh, **placed
    )


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Place every array leaf of ``tree`` on every device of ``mesh`` (``P()``).

    Each process passes the same values (e.g. a guide built from the same seed).
    """
    replicated = NamedSharding(mesh, P())

    def place(x: object) -> object:
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = place(jax.random.key_data(x))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        if isinstance(x, jax.Array | np.ndarray | np.generic):
            return jax.make_array_from_process_local_data(replicated, np.asarray(x))
        return x

    return jax.tree.map(place, tree)


def to_host(tree: PyTree) -> PyTree:
    """Replicated global arrays → ordinary single-device arrays (this process's copy)."""

    def local(x: object) -> object:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x.addressable_data(0), jax.local_devices()[0])
        return x

    return jax.tree.map(local, tree)


def process_unit_range(
    row_units: np.ndarray, process_index: int, process_count: int
) -> tuple[int, int]:
    """Units ``[lo, hi)`` that process ``process_index`` reads.

    Contiguous ranges of whole units, balanced by rows.

    Args:
        row_units: ``[obs]`` unit code of every row of the whole table (any order).
        process_index: this process, ``0 <= process_index < process_count``.
        process_count: number of processes.
    """
    counts = np.bincount(row_units)
    sorted_units = np.repeat(np.arange(len(counts)), counts)
    bounds = balanced_unit_blocks(sorted_units, process_count)
    first_unit = np.r_[sorted_units, len(counts)][bounds]
    return int(first_unit[process_index]), int(first_unit[process_index + 1])


def all_processes_agree(ok: bool) -> bool:  # noqa: FBT001
    """Whether ``ok`` holds in every process (``ok`` itself with a single process)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def global_sum(value: int) -> int:
    """Sum of an integer over all processes (``value`` itself with a single process)."""
    if jax.process_count() == 1:
        return int(value)
    return int(np.sum(multihost_utils.process_allgather(np.int64(value))))


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Where to find the other processes of a multi-host run.

    Attributes:
        coordinator: ``HOST:PORT`` of process 0's coordinator service.
        num_processes: number of processes.
        process_id: this process, ``0 <= process_id < num_processes``.
        timeout_seconds: how long to wait for the others before giving up.
    """

    coordinator: str
    num_processes: int
    process_id: int
    timeout_seconds: int = 60


def initialize_distributed(config: DistributedConfig) -> None:
    """Join a multi-host run through ``jax.distributed`` (gloo collectives on CPU).

    Must be called before any other JAX work in the process.

    Raises:
        ShardingError: a bad address or process id, or a coordinator that cannot be
            reached within ``timeout_seconds``.
    """
    host, _, port = config.coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ShardingError(
            f"coordinator must be HOST:PORT (e.g. 127.0.0.1:9876); got {config.coordinator!r}."
        )
    if config.num_processes < 1:
        raise ShardingError(f"num-processes must be >= 1; got {config.num_processes}.")
    if not 0 <= config.process_id < config.num_processes:
        raise ShardingError(
            f"process-id must be in [0, {config.num_processes - 1}]; got {config.process_id}."
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            config.coordinator,
            num_processes=config.num_processes,
            process_id=config.process_id,
            initialization_timeout=config.timeout_seconds,
        )
    except Exception as exc:  # noqa: BLE001 - any failure to connect is the user's setup
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ShardingError(
            f"could not join the run at {config.coordinator} as process {config.process_id} "
            f"of {config.num_processes} within {config.timeout_seconds} s ({first[:200]}); "
            "check that every process uses the same coordinator and that process 0 is running."
        ) from None
