"""Meshes, placement of panels and parameters on devices, and many hosts.

The mesh has one axis, ``"data"``. A panel's units are cut into a fixed number of blocks
of whole units (a unit's rows never straddle two blocks or devices), balanced by rows and
padded to one length with zero-weight rows that point at one of the block's own units
(never a sentinel index) — or, in the dense layout, laid on a [slot, period] grid whose
padding slots observe nothing; each device holds an equal run of blocks. The block count
depends on the data, not on the device count, so the likelihood's reductions (per block,
then over blocks in a fixed order) are the same on 1, 2, 4 ... devices. Observation arrays
are placed with ``NamedSharding(mesh, P("data"))``; parameters and small arrays are
replicated (``P()``). Many hosts go through ``jax.distributed`` (with gloo collectives on
CPU); each process reads only its blocks' rows and builds its part of the global arrays
(``jax.make_array_from_process_local_data``).
"""

from __future__ import annotations

import dataclasses
import socket
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .panel import DensePanel, Panel

# the parallel core's names, also reachable here (hbjax.sharding is their historical home)
from .parallel.blocks import DATA_AXIS as DATA_AXIS
from .parallel.blocks import MAX_CELL_CHUNK as MAX_CELL_CHUNK
from .parallel.blocks import ShardingError as ShardingError
from .parallel.blocks import (
    _block_rows,
    _local_blocks,
    checked_block_count,
)
from .parallel.blocks import _block_slots as _block_slots
from .parallel.blocks import default_block_count as default_block_count
from .parallel.blocks import default_cell_chunk as default_cell_chunk
from .parallel.blocks import make_mesh as make_mesh
from .parallel.blocks import plan_blocks as plan_blocks
from .parallel.blocks import replicate as replicate
from .parallel.blocks import slot_plan as slot_plan
from .parallel.blocks import to_host as to_host
from .parallel.layouts import DENSE_MIN_FILL as DENSE_MIN_FILL
from .parallel.layouts import AbstractLayout, Auto, Dense, Rows, as_layout

_OBS_FIELDS = ("unit_idx", "cell_idx", "log_price", "counts", "weight")


def _block_count(panel: Panel, mesh: Mesh, n_blocks: int | None) -> int:
    n_devices = mesh.devices.size
    count = (
        n_blocks or panel.n_blocks or default_block_count(panel.n_units, panel.n_cells, n_devices)
    )
    return checked_block_count(count, mesh)


def shard_panel(
    panel: Panel,
    mesh: Mesh,
    *,
    n_blocks: int | None = None,
    layout: str | AbstractLayout = "auto",
    cell_chunk: int | None = None,
) -> Panel | DensePanel:
    """Pad and place a panel on a mesh: equal blocks of whole units, split on ``"data"``.

    The units are cut into ``n_blocks`` contiguous runs balanced by rows
    (:func:`plan_blocks`, from ``panel.unit_rows``); device ``d`` holds blocks
    ``d * n_blocks / n_devices ...``. Arrays over rows or unit slots are placed with
    ``NamedSharding(mesh, P("data"))``; per-unit and per-cell arrays are replicated.

    Layouts (:mod:`hbjax.parallel.layouts`, the modules or their names):
        :class:`~hbjax.parallel.layouts.Rows`: the panel's rows, each block padded to the
        longest with zero-weight rows that point at one of the block's own units (a
        :class:`~hbjax.Panel`).
        :class:`~hbjax.parallel.layouts.Dense`: a [unit slot, period] grid with a mask and
        sufficient statistics (a :class:`~hbjax.DensePanel`): fastest for mostly complete
        panels.
        :class:`~hbjax.parallel.layouts.Auto` (default): dense when at least half the
        unit x period cells are observed.

    With several processes, ``panel`` holds this process's units' rows
    (:func:`read_process_panel`) and every process calls this together.

    Args:
        panel: a host panel.
        mesh: a one-axis ``"data"`` mesh (:func:`make_mesh`).
        n_blocks: number of blocks; default :func:`default_block_count` (or the panel's).
        layout: a layout module, or ``"auto"``, ``"dense"`` or ``"rows"``.
        cell_chunk: with a named dense or auto layout: slots summed together before the
            per-cell scatter (:func:`slot_plan`); default :func:`default_cell_chunk` for
            the mesh's backend (1 on CPU: none). (``Dense(cell_chunk=...)`` says the same.)

    Returns:
        A panel of global device arrays that remembers its mesh and blocks.
    """
    if not isinstance(panel, Panel) or panel.mesh is not None:
        raise ShardingError("shard_panel takes a host Panel (from hbjax.from_frame), once.")
    layout = as_layout(layout, cell_chunk)
    n_blocks = _block_count(panel, mesh, n_blocks)
    unit_rows = np.asarray(panel.unit_rows)
    units = plan_blocks(unit_rows, n_blocks)
    if isinstance(layout, Auto):
        layout = layout.choose(unit_rows.sum() / max(panel.n_units * panel.n_periods, 1))
    if isinstance(layout, Rows):
        return _row_panel(panel, mesh, units)
    if not isinstance(layout, Dense):
        raise ShardingError(f"shard_panel cannot place an elasticity panel as {layout!r}.")
    cell_chunk = layout.cell_chunk
    if cell_chunk is None:
        platform = mesh.devices.flat[0].platform
        cell_chunk = default_cell_chunk(np.asarray(panel.unit_group), units, platform)
    return _dense_panel(panel, mesh, units, cell_chunk)


def _own_rows(unit_idx: np.ndarray, units: np.ndarray, b: int, unit_rows: np.ndarray) -> slice:
    """Rows of block ``b`` in this process's unit-sorted rows (checked complete)."""
    lo, hi = np.searchsorted(unit_idx, [units[b], units[b + 1]])
    expected = int(unit_rows[units[b] : units[b + 1]].sum())
    if hi - lo != expected:
        raise ShardingError(
            f"block {b} should hold {expected} rows of units {units[b]}..{units[b + 1] - 1} "
            f"but this process has {hi - lo}; read its rows with read_process_panel."
        )
    return slice(int(lo), int(hi))


def _place_rows(mesh: Mesh, arrays: dict[str, np.ndarray], n_blocks: int, per_block: int):  # noqa: ANN202
    """Global arrays, split on "data", from this process's blocks (leading axis)."""
    spec = NamedSharding(mesh, P(DATA_AXIS))
    return {
        name: jax.make_array_from_process_local_data(
            spec, value, (n_blocks * per_block, *value.shape[1:])
        )
        for name, value in arrays.items()
    }


def _row_panel(panel: Panel, mesh: Mesh, units: np.ndarray) -> Panel:
    n_blocks = len(units) - 1
    unit_rows = np.asarray(panel.unit_rows)
    length = int(max(_block_rows(unit_rows, units).max(initial=0), 1))
    host = {name: np.asarray(getattr(panel, name)) for name in _OBS_FIELDS}
    local = _local_blocks(mesh, n_blocks)
    blocks = {name: np.zeros(len(local) * length, host[name].dtype) for name in _OBS_FIELDS}
    for slot, b in enumerate(local):
        rows = _own_rows(host["unit_idx"], units, b, unit_rows)
        at, n = slot * length, rows.stop - rows.start
        for name in _OBS_FIELDS:
            blocks[name][at : at + n] = host[name][rows]
        # padding: zero weight (the zeros above), a valid unit of this block
        blocks["unit_idx"][at + n : at + length] = max(units[b + 1] - 1, 0)
    placed = _place_rows(mesh, blocks, n_blocks, length)
    small = replicate({"unit_group": panel.unit_group, "unit_rows": panel.unit_rows}, mesh)
    return dataclasses.replace(panel, **placed, **small, n_blocks=n_blocks, mesh=mesh)


def _sum_over_processes(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Add float64 host arrays over processes, in process order."""
    if jax.process_count() == 1:
        return values
    gathered = multihost_utils.process_allgather(values)
    return {name: np.asarray(v).sum(axis=0) for name, v in gathered.items()}


def _dense_panel(panel: Panel, mesh: Mesh, units: np.ndarray, cell_chunk: int) -> DensePanel:
    n_blocks, n_periods = len(units) - 1, panel.n_periods
    unit_rows, unit_group = np.asarray(panel.unit_rows), np.asarray(panel.unit_group)
    slots, slot_of_unit, block_slot_unit = slot_plan(unit_group, units, cell_chunk)
    unit_idx = np.asarray(panel.unit_idx)
    period = np.asarray(panel.cell_idx) % n_periods
    # this process's units are complete here, so their centres are too (others get 0)
    moments = np.asarray(panel.unit_moments(), np.float64)
    centre = np.where(moments[0] > 0, moments[1] / np.maximum(moments[0], 1e-300), 0.0)
    log_price = np.asarray(panel.log_price, np.float64) - centre[unit_idx]
    local = _local_blocks(mesh, n_blocks)
    grid = np.zeros((len(local) * slots, n_periods), np.float32)
    observed = np.zeros((len(local) * slots, n_periods), bool)
    slot_unit = block_slot_unit[local].reshape(-1).astype(np.int32)
    for k, b in enumerate(local):
        rows = _own_rows(unit_idx, units, b, unit_rows)
        slot = k * slots + slot_of_unit[unit_idx[rows]]
        grid[slot, period[rows]] = log_price[rows]  # centred, cast to float32
        observed[slot, period[rows]] = True
    placed = _place_rows(
        mesh,
        {
            "log_price": grid,
            "observed": observed,
            "slot_unit": slot_unit,
            "slot_group": unit_group[slot_unit].astype(np.int32),
        },
        n_blocks,
        slots,
    )
    counts = np.asarray(panel.counts, np.float64)
    weight = np.asarray(panel.weight, np.float64)
    log_factorial = np.asarray(jax.scipy.special.gammaln(np.asarray(panel.counts) + 1.0))
    stats = _sum_over_processes(
        {
            "counts_by_unit": np.bincount(unit_idx, weight * counts, panel.n_units),
            "counts_log_price_by_unit": np.bincount(
                unit_idx, weight * counts * log_price, panel.n_units
            ),
            "grid_centre": centre,
            "moments_by_unit": moments,
            "counts_by_cell": np.bincount(
                np.asarray(panel.cell_idx), weight * counts, panel.n_cells
            ),
            "log_factorial": np.asarray(np.sum(weight * log_factorial, dtype=np.float64)),
        }
    )
    small = replicate(
        {
            "unit_group": panel.unit_group,
            "unit_rows": panel.unit_rows,
            **{name: value.astype(np.float32) for name, value in stats.items()},
        },
        mesh,
    )
    return DensePanel(
        **placed,
        **small,
        n_units=panel.n_units,
        n_groups=panel.n_groups,
        n_periods=n_periods,
        n_blocks=n_blocks,
        cell_chunk=cell_chunk,
        mesh=mesh,
    )


def all_processes_agree(ok: bool) -> bool:  # noqa: FBT001
    """Whether ``ok`` holds in every process (``ok`` itself with a single process)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


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


def _check_port_free(host: str, port: int) -> None:
    """Process 0 will serve on ``host:port``: refuse early when it cannot."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise ShardingError(
            f"process 0 cannot serve the coordinator on {host}:{port} ({exc.strerror}); "
            "choose a free port."
        ) from None


def _wait_for_coordinator(host: str, port: int, deadline: float, config: DistributedConfig) -> None:
    """Wait (bounded) until process 0's coordinator accepts connections."""
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise ShardingError(
                    f"no coordinator answered at {host}:{port} within "
                    f"{config.timeout_seconds} s (process {config.process_id} of "
                    f"{config.num_processes}); start process 0 with the same --coordinator, "
                    "or raise --timeout."
                ) from None
            time.sleep(0.2)


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
    deadline = time.monotonic() + config.timeout_seconds
    if config.process_id == 0:
        _check_port_free(host, int(port))
    else:  # JAX aborts the process (no exception) if the coordinator never answers
        _wait_for_coordinator(host, int(port), deadline, config)
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


def __getattr__(name: str) -> object:
    """``read_process_panel`` lives with the other table readers (:mod:`hbjax.data`)."""
    if name == "read_process_panel":
        from .data import read_process_panel

        return read_process_panel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
