"""Minibatches of whole units that work together with sharding.

Each step draws, *in every block* of the sharding plan (:func:`hbjax.sharding.plan_blocks`),
a few of that block's units without replacement, with all their rows. A block lives on one
device, so every device samples its own local units and nothing is gathered across devices;
and since blocks do not depend on the device count, neither does the batch: a step sees the
same units on 1 device, N devices or N hosts.

A sampled unit's terms (its prior and its rows' likelihood) are weighted by
``units in its block / units drawn from its block``, so the per-particle log weights are
unbiased estimates of the full-data ones (:class:`UnitBatch`, ``weight``). Global, group
and (group, period) latents enter every step with weight 1.

The full panel stays in host memory (:class:`UnitSampler`, a [unit, period] grid, which
may be a read-only memory map); only the batch goes to the devices, prepared in a
background thread while the current step runs (see :func:`hbjax.fit`'s ``batch_size``).
"""

from __future__ import annotations

import json
import math
import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import gammaln
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ._types import AnyArray, Array, Bool, Float, Int, Scalar
from .families import AbstractCountLikelihood, Poisson
from .panel import Panel
from .parallel.blocks import checked_batch_size, checked_block_count, draw_units
from .parallel.blocks import seed_from_key as seed_from_key
from .parallel.blocks import sum_over_blocks as _sum_over_blocks
from .parallel.host import AbstractSampler
from .sharding import (
    DATA_AXIS,
    ShardingError,
    _local_blocks,
    _own_rows,
    _sum_over_processes,
    default_block_count,
    make_mesh,
    plan_blocks,
)
from .vi.model import AbstractUnitBatch, units_in_batch


class UnitBatch(AbstractUnitBatch):
    """One minibatch of whole units on a [slot, period] grid, split over ``"data"``.

    Slots come in ``n_blocks`` equal runs, one per block of the sharding plan (a chunk
    of steps' batches has a leading ``step`` axis, :meth:`UnitSampler.batches`). Padding
    slots (a block with fewer units than the per-block batch) have ``weight == 0`` and
    point at one of their block's units.

    Attributes:
        unit: ``[slot]`` global unit index.
        group: ``[slot]`` group index of the unit.
        weight: ``[slot]`` units in the block / units drawn from it; 0 for padding.
        log_price: ``[slot, period]`` log prices (0 where not observed).
        counts: ``[slot, period]`` units sold (0 where not observed).
        observed: ``[slot, period]`` whether the cell was observed.
        log_factorial: ``[slot]`` ``sum_t log(counts! )`` of the unit's observed cells.
        n_units: units in the whole panel.
        n_groups: groups in the whole panel.
        n_periods: periods in the whole panel.
        n_blocks: blocks (runs of slots).
        mesh: the device mesh the batch lives on.
    """

    unit: Int[AnyArray, "*step slot"]
    group: Int[AnyArray, "*step slot"]
    weight: Float[AnyArray, "*step slot"]
    log_price: Float[AnyArray, "*step slot period"]
    counts: Float[AnyArray, "*step slot period"]
    observed: Bool[AnyArray, "*step slot period"]
    log_factorial: Float[AnyArray, "*step slot"]
    n_units: int = eqx.field(static=True)
    n_groups: int = eqx.field(static=True)
    n_periods: int = eqx.field(static=True)
    n_blocks: int = eqx.field(static=True)
    mesh: Mesh | None = eqx.field(static=True, default=None)

    @property
    def n_cells(self) -> int:
        """Number of (group, period) cells in the whole panel."""
        return self.n_groups * self.n_periods


class UnitStats(eqx.Module):
    """What a model's centring and start need from a panel, without its rows.

    In a multi-process minibatch fit each process holds only its units' rows on the host;
    :meth:`gather` adds the per-unit moments over processes (each unit's rows live in one
    process), so every process builds the same model and start.

    Attributes:
        moments: ``[5, unit]`` as :meth:`hbjax.Panel.unit_moments`.
        unit_group: ``[unit]`` group of each unit.
        n_units, n_groups, n_periods: sizes of the whole panel.
    """

    moments: Float[AnyArray, "5 unit"]
    unit_group: Int[AnyArray, " unit"]
    n_units: int = eqx.field(static=True)
    n_groups: int = eqx.field(static=True)
    n_periods: int = eqx.field(static=True)

    @classmethod
    def gather(cls, panel: Panel) -> UnitStats:
        """The whole panel's statistics from this process's host panel (all processes call)."""
        local = {"moments": np.asarray(panel.unit_moments(), np.float64)}
        moments = _sum_over_processes(local)["moments"].astype(np.float32)
        return cls(
            moments, np.asarray(panel.unit_group), panel.n_units, panel.n_groups, panel.n_periods
        )

    def unit_moments(self) -> Float[Array, "5 unit"]:
        """The per-unit regression sums."""
        return jnp.asarray(self.moments)


def slot_log_rate(
    unit_elasticity: Float[Array, " slot"],
    unit_effect: Float[Array, " slot"],
    cell_effect: Float[Array, " cell"],
    price_centre: Float[Array, " slot"],
    group: Int[Array, " slot"],
    log_price: Float[Array, "slot period"],
    clip: tuple[float, float] | None = None,
) -> Float[Array, "slot period"]:
    """``beta (x - m) + delta + gamma_{group, t}`` of each slot's grid (clipped if asked)."""
    cells = cell_effect.reshape(-1, log_price.shape[1])
    log_rate = (
        unit_elasticity[:, None] * (log_price - price_centre[:, None])
        + unit_effect[:, None]
        + cells[group]
    )
    if clip is not None:
        log_rate = jnp.clip(log_rate, clip[0], clip[1])
    return log_rate


def slot_log_likelihood(
    unit_elasticity: Float[Array, " slot"],
    unit_effect: Float[Array, " slot"],
    cell_effect: Float[Array, " cell"],
    price_centre: Float[Array, " slot"],
    group: Int[Array, " slot"],
    log_price: Float[Array, "slot period"],
    counts: Float[Array, "slot period"],
    observed: Bool[Array, "slot period"],
    log_factorial: Float[Array, " slot"],
    clip: tuple[float, float] | None = None,
    family: AbstractCountLikelihood | None = None,
    parameter: Array | None = None,
) -> Float[Array, " slot"]:
    """Each slot's unweighted log-likelihood: its unit's observed rows.

    ``sum_t observed * log p(y | exp(beta (x - m) + delta + gamma_{group, t}))`` with the
    count likelihood ``family`` (default :class:`hbjax.Poisson`) and its ``parameter``.
    """
    log_rate = slot_log_rate(
        unit_elasticity, unit_effect, cell_effect, price_centre, group, log_price, clip
    )
    family = Poisson() if family is None else family
    terms = jnp.where(observed, family.log_kernel(log_rate, counts, parameter), 0.0)
    return jnp.sum(terms, axis=1) - log_factorial


def batch_log_likelihood(
    unit_elasticity: Float[Array, " slot"],
    unit_effect: Float[Array, " slot"],
    cell_effect: Float[Array, " cell"],
    price_centre: Float[Array, " slot"],
    batch: UnitBatch,
    clip: tuple[float, float] | None = None,
    family: AbstractCountLikelihood | None = None,
    parameter: Array | None = None,
) -> Scalar:
    """Weighted log-likelihood of a batch's units (an unbiased full-data estimate).

    ``sum_slot weight * slot_log_likelihood``, per block on each device, then the blocks
    in order (the same sum on any device count). The slot parameters are the sampled
    units' values; ``cell_effect`` and ``parameter`` are replicated.
    """
    parameter = jnp.zeros((), jnp.float32) if parameter is None else parameter

    def per_device(beta, delta, gamma, theta, centre, group, weight, *grid):  # noqa: ANN001, ANN202
        per_slot = weight * slot_log_likelihood(
            beta, delta, gamma, centre, group, *grid, clip, family, theta
        )
        local_blocks = batch.n_blocks // (1 if batch.mesh is None else batch.mesh.devices.size)
        partials = jnp.sum(per_slot.reshape(local_blocks, -1), axis=1)
        if batch.mesh is None:
            return jnp.sum(partials)
        return _sum_over_blocks(partials)

    args = (
        unit_elasticity,
        unit_effect,
        cell_effect,
        parameter,
        price_centre,
        batch.group,
        batch.weight,
        batch.log_price,
        batch.counts,
        batch.observed,
        batch.log_factorial,
    )
    if batch.mesh is None:
        return per_device(*args)
    return jax.shard_map(
        per_device,
        mesh=batch.mesh,
        in_specs=(P(DATA_AXIS), P(DATA_AXIS), P(), P(), P(DATA_AXIS)) + (P(DATA_AXIS),) * 6,
        out_specs=P(),
    )(*args)


def _rows_on_grid(
    panel: Panel, rows: slice | np.ndarray, slot: np.ndarray, n_slots: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Rows ``rows`` of a host panel on a ``[slot, period]`` grid (row ``r`` to ``slot[r]``).

    Returns the grids (``log_price``, ``counts``, ``observed``) and each slot's
    ``sum log(counts!)`` over its observed rows.
    """
    weight = np.asarray(panel.weight)[rows]
    period = np.asarray(panel.cell_idx)[rows] % panel.n_periods
    counts = np.asarray(panel.counts)[rows]
    shape = (n_slots, panel.n_periods)
    grids = {
        "log_price": np.zeros(shape, np.float32),
        "counts": np.zeros(shape, np.float32),
        "observed": np.zeros(shape, bool),
    }
    grids["log_price"][slot, period] = np.asarray(panel.log_price)[rows]
    grids["counts"][slot, period] = counts
    grids["observed"][slot, period] = weight > 0
    log_fact = np.asarray(gammaln(counts.astype(np.float64) + 1.0)) * (weight > 0)
    return grids, np.bincount(slot, log_fact, n_slots).astype(np.float32)


def unit_batch(panel: Panel, units: Int[np.ndarray, " slot"]) -> UnitBatch:
    """A :class:`UnitBatch` of the given units with all their rows, weight 1, unplaced.

    For checks on a subsample of units (:mod:`hbjax.diagnostics`). ``panel``: a host panel
    holding those units' rows (rows sorted by unit, as :func:`hbjax.from_frame` makes them).
    """
    if not isinstance(panel, Panel) or panel.mesh is not None:
        raise TypeError("unit_batch takes a host Panel (from hbjax.from_frame), not a placed one.")
    units = np.asarray(units, np.int64)
    unit_idx = np.asarray(panel.unit_idx)
    starts = np.searchsorted(unit_idx, units, side="left")
    stops = np.searchsorted(unit_idx, units, side="right")
    slot = np.repeat(np.arange(len(units)), stops - starts)
    rows = np.concatenate([np.arange(a, b) for a, b in zip(starts, stops, strict=True)] or [[]])
    grid, log_factorial = _rows_on_grid(panel, rows.astype(np.int64), slot, len(units))
    return UnitBatch(
        unit=jnp.asarray(units, jnp.int32),
        group=jnp.asarray(np.asarray(panel.unit_group)[units], jnp.int32),
        weight=jnp.ones(len(units), jnp.float32),
        **{name: jnp.asarray(value) for name, value in grid.items()},
        log_factorial=jnp.asarray(log_factorial),
        n_units=panel.n_units,
        n_groups=panel.n_groups,
        n_periods=panel.n_periods,
        n_blocks=1,
    )


class UnitSampler(AbstractSampler):
    """Draws :class:`UnitBatch` es from a panel held in host memory.

    Every process builds the same block plan as :func:`hbjax.shard_panel` (so a panel from
    :func:`hbjax.sharding.read_process_panel` holds exactly the rows this process needs)
    and keeps its blocks' units on a host [unit, period] grid. Step ``s`` draws, in block
    ``b``, ``per_block`` units without replacement with ``numpy.random.default_rng((seed,
    s, b))``: the batch of a step is the same on any device count.

    Args:
        panel: a host :class:`~hbjax.Panel` (this process's rows in a multi-process run).
        batch_size: units per step, over all devices. Rounded *up* to a multiple of the
            number of blocks (itself a multiple of the device count); see ``batch_size``.
        mesh: the mesh; default: all devices.
        n_blocks: number of blocks; default :func:`hbjax.sharding.default_block_count`.
        seed: sampling seed.
        memmap_dir: if given, the host grid is written there once and read back as a
            read-only memory map (only the pages of sampled units are ever read).

    Attributes:
        batch_size: the actual units per step (``per_block * n_blocks``).
        per_block: units drawn from each block per step.
        steps_per_epoch: ``n_units / batch_size`` (fractional).
    """

    def __init__(
        self,
        panel: Panel,
        batch_size: int,
        *,
        mesh: Mesh | None = None,
        n_blocks: int | None = None,
        seed: int = 0,
        memmap_dir: str | os.PathLike[str] | None = None,
    ):
        if not isinstance(panel, Panel) or panel.mesh is not None:
            raise TypeError(
                "minibatching takes a host Panel (from hbjax.from_frame or "
                "read_process_panel), not a placed one: the full panel stays on the host."
            )
        mesh = make_mesh() if mesh is None else mesh
        n_blocks = n_blocks or default_block_count(panel.n_units, panel.n_cells, mesh.devices.size)
        unit_rows = np.asarray(panel.unit_rows)
        sizes = (panel.n_units, panel.n_groups, panel.n_periods)
        self._configure(batch_size, mesh, plan_blocks(unit_rows, n_blocks), sizes, seed)
        self._grid(panel, unit_rows, memmap_dir)

    def _configure(
        self,
        batch_size: int,
        mesh: Mesh,
        units: np.ndarray,
        sizes: tuple[int, int, int],
        seed: int,
    ) -> None:
        """Check the batch size and set the plan (shared by ``__init__`` and :meth:`load`)."""
        self.n_units, self.n_groups, self.n_periods = sizes
        batch_size = checked_batch_size(batch_size, self.n_units)
        self.mesh, self.units = mesh, units
        self.n_blocks = checked_block_count(len(units) - 1, mesh)
        self.per_block = math.ceil(batch_size / self.n_blocks)
        self.batch_size = self.per_block * self.n_blocks
        self.steps_per_epoch = self.n_units / self.batch_size
        self.seed = int(seed)
        self.local = _local_blocks(mesh, self.n_blocks)

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write the host grid and the block plan to ``directory`` for :meth:`load`.

        ``.npy`` files and ``sampler.json``; another process can then memory-map the grid
        instead of reading the table (see ``benchmarks/minibatch_memory.py``).
        """
        os.makedirs(directory, exist_ok=True)
        arrays = {
            **self.grid,
            "log_factorial": self.log_factorial,
            "unit_group": self.unit_group,
            "units": self.units,
        }
        for name, value in arrays.items():
            path = os.path.join(directory, f"{name}.npy")
            if isinstance(value, np.memmap) and os.path.abspath(value.filename) == os.path.abspath(
                path
            ):
                continue  # already there (memmap_dir == directory)
            np.save(path, np.asarray(value))
        meta = {
            "n_units": self.n_units,
            "n_groups": self.n_groups,
            "n_periods": self.n_periods,
            "first_unit": self.first_unit,
            "grid_units": int(self.grid["counts"].shape[0]),
        }
        with open(os.path.join(directory, "sampler.json"), "w") as handle:
            json.dump(meta, handle)

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        batch_size: int,
        *,
        mesh: Mesh | None = None,
        seed: int = 0,
    ) -> UnitSampler:
        """A sampler over a grid written by :meth:`save`, memory-mapped read-only.

        Only the pages of sampled units are ever read; the grid is never loaded whole.
        The mesh's device count must divide the saved block count, and the saved grid must
        hold this process's blocks (save from a single process to serve any process).
        """
        with open(os.path.join(directory, "sampler.json")) as handle:
            meta = json.load(handle)
        load = lambda name: np.load(os.path.join(directory, f"{name}.npy"), mmap_mode="r")  # noqa: E731
        self = cls.__new__(cls)
        sizes = (meta["n_units"], meta["n_groups"], meta["n_periods"])
        mesh = make_mesh() if mesh is None else mesh
        self._configure(batch_size, mesh, np.asarray(load("units")), sizes, seed)
        self.first_unit = int(meta["first_unit"])
        lo, hi = self.units[self.local[0]], self.units[self.local[-1] + 1]
        if lo < self.first_unit or hi > self.first_unit + meta["grid_units"]:
            raise ShardingError(
                f"the grid in {directory} holds units {self.first_unit}.."
                f"{self.first_unit + meta['grid_units'] - 1}, not this process's {lo}..{hi - 1}."
            )
        self.grid = {name: load(name) for name in ("log_price", "counts", "observed")}
        self.log_factorial = np.asarray(load("log_factorial"))
        self.unit_group = np.asarray(load("unit_group"))
        return self

    def _grid(self, panel: Panel, unit_rows: np.ndarray, memmap_dir: object) -> None:
        """This process's units on a host [local unit, period] grid."""
        first, last = self.units[self.local[0]], self.units[self.local[-1] + 1]
        self.first_unit = int(first)
        n_local = int(last - first)
        unit_idx = np.asarray(panel.unit_idx)
        rows = slice(
            _own_rows(unit_idx, self.units, self.local[0], unit_rows).start,
            _own_rows(unit_idx, self.units, self.local[-1], unit_rows).stop,
        )
        grids, self.log_factorial = _rows_on_grid(panel, rows, unit_idx[rows] - first, n_local)
        if memmap_dir is not None:
            os.makedirs(memmap_dir, exist_ok=True)
            for name, value in grids.items():
                path = os.path.join(memmap_dir, f"{name}.npy")
                np.save(path, value)
                grids[name] = np.load(path, mmap_mode="r")
        self.grid = grids
        self.unit_group = np.asarray(panel.unit_group)

    def host_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's slots of step ``step``'s batch, as host arrays."""
        unit, weight = draw_units(self.units, self.local, self.per_block, self.seed, step)
        local = unit - self.first_unit
        return {
            "unit": unit.astype(np.int32),
            "group": self.unit_group[unit].astype(np.int32),
            "weight": weight,
            "log_price": np.asarray(self.grid["log_price"][local]),
            "counts": np.asarray(self.grid["counts"][local]),
            "observed": np.asarray(self.grid["observed"][local]),
            "log_factorial": self.log_factorial[local],
        }

    def batch(self, step: int) -> UnitBatch:
        """Step ``step``'s batch, placed on the mesh (each process sends its own slots)."""
        return self._place([self.host_batch(step)], stacked=False)

    def batches(self, first_step: int, count: int) -> UnitBatch:
        """Steps ``first_step .. first_step + count - 1``: a batch with a leading step axis.

        Placed with ``P(None, "data")``: each device gets its own slots of every step.
        """
        return self._place([self.host_batch(first_step + i) for i in range(count)], stacked=True)

    def _place(self, hosts: list[dict[str, np.ndarray]], *, stacked: bool) -> UnitBatch:
        """Global arrays from this process's slots of one step, or of several stacked."""
        total = self.per_block * self.n_blocks
        spec = P(None, DATA_AXIS) if stacked else P(DATA_AXIS)
        lead = (len(hosts),) if stacked else ()
        placed = {}
        for name in hosts[0]:
            value = np.stack([h[name] for h in hosts]) if stacked else hosts[0][name]
            shape = (*lead, total, *hosts[0][name].shape[1:])
            placed[name] = jax.make_array_from_process_local_data(
                NamedSharding(self.mesh, spec), value, shape
            )
        return UnitBatch(
            **placed,
            n_units=self.n_units,
            n_groups=self.n_groups,
            n_periods=self.n_periods,
            n_blocks=self.n_blocks,
            mesh=self.mesh,
        )

    @property
    def bytes_per_step(self) -> int:
        """Bytes of one step's batch (~9 per cell and 16 per slot)."""
        return self.batch_size * (self.n_periods * 9 + 16)

    def host_bytes(self) -> int:
        """Bytes of this process's host grid (what never goes to the devices whole)."""
        return int(sum(v.nbytes for v in self.grid.values()) + self.log_factorial.nbytes)


__all__ = [
    "UnitBatch",
    "UnitSampler",
    "UnitStats",
    "batch_log_likelihood",
    "seed_from_key",
    "slot_log_likelihood",
    "slot_log_rate",
    "unit_batch",
    "units_in_batch",
]
