"""Meshes, block plans and placement: the parallel core (JAX and NumPy only).

The mesh has one axis, ``"data"``. Units are cut into a fixed number of blocks of whole
units (:func:`plan_blocks`); the block count depends on the data, not on the device count
(:func:`default_block_count`), and each device holds an equal run of blocks. Per-block
partial sums are combined in block order (:func:`sum_over_blocks`), so reductions are the
same on 1, 2, 4 ... devices. Parameters are replicated (:func:`hbjax.vi.devices.replicate`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh
from jaxtyping import Array, Float, Int

from .._types import float_dtype

#: The mesh axis along which observation rows are split.
DATA_AXIS = "data"


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


#: Block counts tried in order: 24 first (divisible by 1, 2, 3, 4, 6, 8, 12, 24), larger ones
#: for device counts 24 does not cover, smaller ones for small panels. Few blocks keep the
#: per-block partial sums (what makes results independent of the device count) cheap.
BLOCK_COUNTS = (24, 48, 120, 240, 480, 960, 12, 6, 4, 2, 1)
_MIN_UNITS_PER_BLOCK = 4
_MAX_CELL_PARTIALS = 2**22  # floats in the [blocks, cells] gradient partials


def default_block_count(n_units: int, n_cells: int, n_devices: int) -> int:
    """How many blocks of whole units to cut a panel into for ``n_devices`` devices.

    The first of :data:`BLOCK_COUNTS` that ``n_devices`` divides, with at least four units
    per block and ``blocks * n_cells`` below 4M floats. The count depends on the device
    count only through divisibility: fits of one panel on 1, 2, 3, 4, 6, 8, 12 or 24
    devices use the same 24 blocks (and give bitwise-identical results on CPU for 2 or more
    devices).
    """
    for count in BLOCK_COUNTS:
        if (
            count % n_devices == 0
            and n_units >= _MIN_UNITS_PER_BLOCK * count
            and count * n_cells <= _MAX_CELL_PARTIALS
        ):
            return count
    return n_devices


def plan_blocks(unit_rows: np.ndarray, n_blocks: int) -> np.ndarray:
    """Cut units ``0..n_units-1`` into ``n_blocks`` contiguous runs balanced by rows.

    Args:
        unit_rows: ``[unit]`` rows of each unit.
        n_blocks: number of blocks.

    Returns:
        ``[n_blocks + 1]`` unit offsets: block ``b`` holds units ``[out[b], out[b + 1])``.
        Each cut falls at the unit boundary nearest to an equal split of the rows.
    """
    unit_rows = np.asarray(unit_rows, dtype=np.int64)
    ends = np.cumsum(unit_rows)  # rows before the end of each unit
    starts = np.r_[0, ends]  # rows before unit u, for u = 0..n_units
    targets = np.arange(1, n_blocks) * starts[-1] / n_blocks
    right = np.clip(np.searchsorted(starts, targets), 0, len(starts) - 1)
    left = np.clip(right - 1, 0, len(starts) - 1)
    nearest = np.where(targets - starts[left] <= starts[right] - targets, left, right)
    cuts = np.maximum.accumulate(nearest) if n_blocks > 1 else np.zeros(0, np.int64)
    return np.r_[0, cuts, len(unit_rows)].astype(np.int64)


def _device_blocks(mesh: Mesh, n_blocks: int) -> list[range]:
    """Blocks held by each device of the mesh, in mesh order."""
    per_device = n_blocks // mesh.devices.size
    return [range(i * per_device, (i + 1) * per_device) for i in range(mesh.devices.size)]


def local_blocks(mesh: Mesh, n_blocks: int) -> list[int]:
    """Blocks held by this process's devices, in mesh order."""
    blocks = _device_blocks(mesh, n_blocks)
    mine = [
        b
        for device, device_blocks in zip(mesh.devices.flat, blocks, strict=True)
        if device.process_index == jax.process_index()
        for b in device_blocks
    ]
    return mine


def checked_block_count(n_blocks: int, mesh: Mesh) -> int:
    """``n_blocks``, refused unless the mesh's device count divides it."""
    n_devices = mesh.devices.size
    if n_blocks % n_devices:
        raise ShardingError(
            f"{n_blocks} blocks cannot be split evenly over {n_devices} devices; pass "
            f"n_blocks as a multiple of {n_devices}."
        )
    return n_blocks


def checked_batch_size(batch_size: object, n_units: int) -> int:
    """``batch_size`` as an int, refused unless it is from 1 to ``n_units - 1``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
        raise TypeError(f"batch_size must be an int; got {batch_size!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 unit; got {batch_size}.")
    if batch_size >= n_units:
        raise ValueError(
            f"batch_size {batch_size} is not smaller than the number of units "
            f"({n_units}): fit the full batch instead (hbjax.FullBatch, or leave --batch-size out)."
        )
    return int(batch_size)


def slot_plan(
    unit_group: np.ndarray, units: np.ndarray, chunk: int
) -> tuple[int, np.ndarray, np.ndarray]:
    """Where each unit sits in the dense grid, and what fills the padding slots.

    Within a block, units go by group (then by unit), and each group's run of units is
    padded to a whole number of ``chunk`` slots; blocks are padded to one length (a
    multiple of ``chunk``). A chunk of slots then never mixes groups, so the kernel sums
    each chunk first and scatters ``chunk`` times fewer rows onto the (block, group, period)
    cells (few targets: the costly case for a GPU's atomic adds). Padding slots belong to a
    unit of their run (of their block, for the block's tail) and observe nothing.

    Args:
        unit_group: ``[unit]`` group of each unit.
        units: ``[block + 1]`` unit offsets (:func:`plan_blocks`).
        chunk: slots per chunk (1: no padding within blocks).

    Returns:
        ``(slots, slot_of_unit, slot_unit)``: slots per block, ``[unit]`` slot of each unit
        within its block, and ``[block, slots]`` unit of each slot.
    """
    n_units, n_blocks = len(unit_group), len(units) - 1
    block_of = np.repeat(np.arange(n_blocks), np.diff(units))
    order = np.lexsort((np.arange(n_units), unit_group, block_of))  # by block, group, unit
    block_sorted, group_sorted = block_of[order], unit_group[order]
    changes = (block_sorted[1:] != block_sorted[:-1]) | (group_sorted[1:] != group_sorted[:-1])
    run_start = np.flatnonzero(np.r_[n_units > 0, changes])  # runs: (block, group)
    run_of = np.cumsum(np.r_[n_units > 0, changes]) - 1
    padded = -(-np.diff(np.r_[run_start, n_units]) // chunk) * chunk
    run_block = block_sorted[run_start]
    before = np.cumsum(padded) - padded  # padded slots before each run, over all blocks
    first_run = np.searchsorted(run_block, np.arange(n_blocks))
    run_offset = before - np.r_[before, 0][first_run][run_block]  # ... within its block
    per_block = np.bincount(run_block, padded, minlength=n_blocks).astype(np.int64)
    slots = int(max(per_block.max(initial=0), chunk))
    slot_of_unit = np.empty(n_units, np.int64)
    slot_of_unit[order] = np.arange(n_units) - run_start[run_of] + run_offset[run_of]
    # padding slots point at: in a run, the run's last unit; in a block's tail, its last
    # run's last unit (the tail's chunks are then of one group too); in an empty block, a
    # unit next to it. They observe nothing, so they add exact zeros.
    slot_unit = np.repeat(np.maximum(units[1:] - 1, 0)[:, None], slots, axis=1)
    if n_units:
        last_in_run = order[np.r_[run_start[1:], n_units] - 1]
        run_slots = np.repeat(np.arange(len(run_start)), padded)
        within = np.arange(len(run_slots)) - np.repeat(before, padded)
        slot_unit[run_block[run_slots], run_offset[run_slots] + within] = last_in_run[run_slots]
        slot_unit[block_of, slot_of_unit] = np.arange(n_units)
        has_units = per_block > 0
        last_run = np.searchsorted(run_block, np.arange(n_blocks), "right") - 1
        tail = (np.arange(slots)[None, :] >= per_block[:, None]) & has_units[:, None]
        slot_unit = np.where(tail, last_in_run[np.maximum(last_run, 0)][:, None], slot_unit)
    return slots, slot_of_unit, slot_unit


#: Most slots a dense grid's cell sums add at once per chunk (see :func:`slot_plan`).
MAX_CELL_CHUNK = 64
#: Most padding the chunked slot layout may add, as a share of the units.
_CHUNK_PADDING = 0.1


def default_cell_chunk(unit_group: np.ndarray, units: np.ndarray, platform: str = "gpu") -> int:
    """Slots per chunk of the dense grid for a backend (``platform``: ``"cpu"``, ``"gpu"``...).

    On CPU 1: there the padding costs more than the shorter scatter saves (measured on 2
    cores: chunks of 64 at 100k products, 7% fewer iterations/s). Elsewhere the largest power of two
    <= :data:`MAX_CELL_CHUNK` whose padding (each block's run of each group rounded up to
    whole chunks) grows the grid by at most 10%. Depends on the data, the block plan and
    the backend, never on the device count, so every device count gives the same sums.
    """
    if platform == "cpu":
        return 1
    unpadded = _block_slots(unit_group, units, 1)
    chunk = MAX_CELL_CHUNK
    while chunk > 1 and _block_slots(unit_group, units, chunk) > (1 + _CHUNK_PADDING) * unpadded:
        chunk //= 2
    return chunk


def _block_slots(unit_group: np.ndarray, units: np.ndarray, chunk: int) -> int:
    """Slots per block of :func:`slot_plan`'s layout (the longest block's padded runs)."""
    blocks = np.repeat(np.arange(len(units) - 1), np.diff(units))
    n_groups = int(unit_group.max(initial=0)) + 1
    run_units = np.bincount(blocks * n_groups + unit_group, minlength=(len(units) - 1) * n_groups)
    padded = (-(-run_units // chunk) * chunk).reshape(len(units) - 1, n_groups).sum(axis=1)
    return int(max(padded.max(initial=0), chunk))


def chunk_sums(
    values: Float[Array, "slot period"], key: Int[Array, " slot"], chunk: int
) -> tuple[Float[Array, "chunk period"], Int[Array, " chunk"]]:
    """``values`` summed over each run of ``chunk`` slots, and each run's ``key``.

    For :func:`slot_plan`'s layout, where a run of ``chunk`` slots never mixes keys: the
    dense kernels add each run before their per-cell scatter (``chunk`` 1: unchanged).
    """
    if chunk == 1:
        return values, key
    return values.reshape(-1, chunk, values.shape[1]).sum(axis=1), key[::chunk]


def per_block_segment_sum(
    values: Float[Array, " item *rest"],
    segment_ids: Int[Array, " item"],
    n_blocks: int,
    num_segments: int,
    *,
    indices_are_sorted: bool = False,
) -> Float[Array, "block segment_values"]:
    """Segment sums of each of ``n_blocks`` equal consecutive blocks of ``values``.

    One segment sum over ``(block, segment)`` ids, not one per block: returns
    ``[n_blocks, num_segments * prod(rest)]``.
    """
    per_block = segment_ids.shape[0] // n_blocks
    ids = jnp.arange(segment_ids.shape[0]) // per_block * num_segments + segment_ids
    sums = jax.ops.segment_sum(
        values, ids, n_blocks * num_segments, indices_are_sorted=indices_are_sorted
    )
    return sums.reshape(n_blocks, -1)


def sum_over_blocks(partials: Float[Array, " block *rest"]) -> Float[Array, "*rest"]:
    """Gather every device's per-block partials and sum them in block order (in shard_map).

    The same reduction, of the same shape, runs whatever the device count: the sum over
    blocks does not depend on how blocks are spread over devices.
    """
    gathered = jax.lax.all_gather(partials, DATA_AXIS, tiled=True, to="invarying")
    return jnp.sum(gathered, axis=0)


def draw_units(
    units: np.ndarray, blocks: Sequence[int], per_block: int, seed: int, step: int
) -> tuple[np.ndarray, np.ndarray]:
    """The units of step ``step``'s minibatch in ``blocks``, and their weights (host).

    In block ``b``, ``per_block`` of its units without replacement, drawn with
    ``numpy.random.default_rng((seed, step, b))``: the same batch on any device count.
    Each drawn unit weighs ``units in the block / units drawn``; padding slots (a block
    with fewer units than ``per_block``) weigh 0 and point at the block's last unit.

    Returns:
        ``[len(blocks) * per_block]`` global unit indices and weights.
    """
    picks, weights = [], []
    for b in blocks:
        lo, hi = int(units[b]), int(units[b + 1])
        n = hi - lo
        rng = np.random.default_rng((seed, int(step), b))
        take = min(per_block, n)
        chosen = np.sort(rng.choice(n, size=take, replace=False)) + lo if n else np.zeros(0)
        pad = np.full(per_block - take, max(hi - 1, 0))
        picks.append(np.r_[chosen, pad].astype(np.int64))
        weights.append(np.r_[np.full(take, n / max(take, 1)), np.zeros(len(pad))])
    return np.concatenate(picks), np.concatenate(weights).astype(float_dtype())


__all__ = [
    "BLOCK_COUNTS",
    "checked_batch_size",
    "checked_block_count",
    "chunk_sums",
    "DATA_AXIS",
    "ShardingError",
    "default_block_count",
    "default_cell_chunk",
    "MAX_CELL_CHUNK",
    "draw_units",
    "make_mesh",
    "per_block_segment_sum",
    "plan_blocks",
    "slot_plan",
    "sum_over_blocks",
]
