"""Any model's data as rows of whole units: sharded over devices and minibatched.

A model of your own gets what hbjax's elasticity model gets by writing its likelihood per
row (:class:`AbstractRowModel`) and handing :func:`hbjax.fit` its data as
:class:`UnitRows`: every leaf of ``columns`` has one entry per row, and ``unit`` says
which unit each row belongs to. Then

- ``fit(..., FullBatch(rows, mesh))`` places the rows with :func:`shard_rows`: the units
  are cut into a fixed number of blocks of whole units
  (:func:`hbjax.parallel.blocks.plan_blocks`), each device holds an equal run of blocks,
  and the log-likelihood and its gradient are summed per block, then over blocks in block
  order (:func:`row_total`): the same sums on 1, 2, 4 ... devices;
- ``fit(..., Minibatches(rows, n))`` draws whole units in every block each step
  (:class:`RowSampler`) and weighs their terms so that the log weights are unbiased.

Padding rows (blocks made equal) repeat a real row (of their block, unless it has none)
with weight 0.
"""

from __future__ import annotations

import abc
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int, PyTree, Scalar, Shaped

from .._types import AnyArray, float_dtype
from ..vi.host import AbstractHostData, AbstractSampler
from ..vi.model import AbstractUnitBatch, AbstractUnitModel
from .blocks import (
    DATA_AXIS,
    ShardingError,
    checked_batch_size,
    checked_block_count,
    default_block_count,
    draw_units,
    local_blocks,
    make_mesh,
    plan_blocks,
    sum_over_blocks,
)


class UnitRows(AbstractHostData):
    """Rows of data, each belonging to one unit; sorted by unit (:meth:`build`).

    Attributes:
        unit: ``[row]`` the unit of each row (``0 .. n_units - 1``; in a minibatch, the
            slot; a chunk of batches has a leading ``step`` axis).
        weight: ``[row]`` 1 for a row of data, 0 for padding.
        columns: a pytree of ``[row, ...]`` arrays: the data your model reads.
        n_units: units (every unit latent has this length).
        n_blocks: equal runs of rows, one per block (placed rows); ``None`` on the host.
        mesh: the mesh the rows are placed on; ``None`` on the host.
    """

    unit: Int[AnyArray, "*step row"]
    weight: Float[AnyArray, "*step row"]
    columns: PyTree[AnyArray]
    n_units: int = eqx.field(static=True)
    n_blocks: int | None = eqx.field(static=True, default=None)
    mesh: Mesh | None = eqx.field(static=True, default=None)

    @classmethod
    def build(
        cls,
        unit: Shaped[AnyArray, " row"],
        columns: PyTree[AnyArray],
        *,
        n_units: int | None = None,
    ) -> UnitRows:
        """Host rows from ``unit`` and ``columns``, sorted (stably) by unit.

        Args:
            unit: ``[row]`` whole numbers from 0: each row's unit.
            columns: a pytree of arrays with one entry per row along their first axis.
            n_units: the number of units (default ``max(unit) + 1``; units without rows
                are allowed: the prior alone informs them).

        Raises:
            ValueError: units that are not whole numbers from 0 to ``n_units - 1``, or a
                column whose length is not the number of rows (named).
        """
        unit = np.asarray(unit)
        if unit.ndim != 1 or not np.issubdtype(unit.dtype, np.integer):
            raise ValueError(f"unit must be a 1-d array of ints; got {unit.dtype}{unit.shape}.")
        n_units = int(unit.max(initial=-1)) + 1 if n_units is None else int(n_units)
        if len(unit) and (unit.min() < 0 or unit.max() >= n_units):
            raise ValueError(
                f"unit holds {int(unit.min())}..{int(unit.max())}; units must run from 0 to "
                f"n_units - 1 = {n_units - 1}."
            )
        leaves, treedef = jax.tree.flatten(columns)
        paths = [
            jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(columns)[0]
        ]
        for path, leaf in zip(paths, leaves, strict=True):
            if np.ndim(leaf) < 1 or np.shape(leaf)[0] != len(unit):
                raise ValueError(
                    f"column {path or 'columns'} has shape {np.shape(leaf)}; every column needs "
                    f"one entry per row ({len(unit)})."
                )
        order = np.argsort(unit, kind="stable")
        return cls(
            unit=unit[order].astype(np.int32),
            weight=np.ones(len(unit), float_dtype()),
            columns=jax.tree.unflatten(treedef, [np.asarray(x)[order] for x in leaves]),
            n_units=n_units,
        )

    @property
    def unit_rows(self) -> np.ndarray:
        """``[unit]`` rows of each unit (host rows, sorted by unit: none is read twice)."""
        bounds = np.searchsorted(self.unit, np.arange(self.n_units + 1), side="left")
        return np.diff(bounds)

    def place(self, mesh: Mesh | None) -> tuple[UnitRows, Mesh | None]:
        """Blocks of whole units on ``mesh`` (:func:`shard_rows`), or unsplit without one.

        Without a mesh the rows go to the default device and are summed plainly.
        """
        if mesh is None:
            return jax.device_put(self), None
        return shard_rows(self, mesh), mesh

    def check_model(self, model: object) -> None:
        """Rows are read by an :class:`AbstractRowModel` only (``TypeError`` otherwise)."""
        if not isinstance(model, AbstractRowModel):
            raise TypeError(
                f"minibatches of UnitRows need an hbjax.AbstractRowModel; "
                f"{type(model).__name__} is not one."
            )

    def sampler(self, batch_size: int, mesh: Mesh | None, seed: int) -> RowSampler:
        """A :class:`RowSampler` of ``batch_size`` units per step."""
        return RowSampler(self, batch_size, mesh=mesh, seed=seed)

    def unit_batch(self, units: Int[np.ndarray, " slot"]) -> RowBatch:
        """A :class:`RowBatch` of the given units with all their rows, weight 1, unplaced."""
        if self.mesh is not None:
            raise TypeError("unit_batch takes host UnitRows, not placed ones.")
        units = np.asarray(units, np.int64)
        starts = _unit_starts(self.unit_rows)
        index = np.concatenate([np.arange(starts[u], starts[u + 1]) for u in units] or [[]])
        slot = np.repeat(np.arange(len(units)), starts[units + 1] - starts[units])
        host = _gather_rows(self, index.astype(np.int64), np.ones(len(index)), slot)
        rows = jax.tree.map(jnp.asarray, host)
        return RowBatch(
            unit=jnp.asarray(units, jnp.int32),
            weight=jnp.ones(len(units), float_dtype()),
            rows=UnitRows(**rows, n_units=len(units)),
            n_units=self.n_units,
        )


def _unit_starts(unit_rows: np.ndarray) -> np.ndarray:
    """``[unit + 1]`` the first row of every unit (host rows sorted by unit), then the end."""
    return np.r_[0, np.cumsum(unit_rows)]


def _gather_rows(rows: UnitRows, index: np.ndarray, weight: np.ndarray, unit: np.ndarray) -> dict:
    """Host arrays of the rows at ``index`` with the given weights and unit labels."""
    return {
        "unit": unit.astype(np.int32),
        "weight": weight.astype(float_dtype()),
        "columns": jax.tree.map(lambda x: np.asarray(x)[index], rows.columns),
    }


def place_stacked(mesh: Mesh, host: dict, total: int, *, stacked: bool) -> dict:
    """Global arrays split on ``"data"`` (after a leading step axis when ``stacked``)."""
    spec = NamedSharding(mesh, P(None, DATA_AXIS) if stacked else P(DATA_AXIS))

    def place(x: np.ndarray) -> jax.Array:
        shape = (x.shape[0], total, *x.shape[2:]) if stacked else (total, *x.shape[1:])
        return jax.make_array_from_process_local_data(spec, x, shape)

    return jax.tree.map(place, host)


def shard_rows(rows: UnitRows, mesh: Mesh, *, n_blocks: int | None = None) -> UnitRows:
    """Place host rows on ``mesh``: blocks of whole units, equal lengths, split on ``"data"``.

    Every process passes the same rows and sends its own blocks.

    Args:
        rows: host rows (:meth:`UnitRows.build`).
        mesh: a one-axis ``"data"`` mesh (:func:`hbjax.make_mesh`).
        n_blocks: number of blocks (a multiple of the device count); default
            :func:`hbjax.parallel.blocks.default_block_count`.
    """
    if not isinstance(rows, UnitRows) or rows.mesh is not None:
        raise ShardingError("shard_rows takes host UnitRows (UnitRows.build), once.")
    if not len(rows.unit):
        raise ShardingError("there are no rows to place.")
    n_blocks = checked_block_count(
        n_blocks or default_block_count(rows.n_units, 1, mesh.devices.size), mesh
    )
    unit_rows = rows.unit_rows
    units = plan_blocks(unit_rows, n_blocks)
    starts = _unit_starts(unit_rows)
    length = int(max(np.diff(starts[units]).max(initial=0), 1))  # the longest block's rows
    parts = []
    for b in local_blocks(mesh, n_blocks):
        lo, hi = starts[units[b]], starts[units[b + 1]]
        index = np.r_[np.arange(lo, hi), np.full(length - (hi - lo), max(hi - 1, 0))]
        weight = np.r_[np.ones(hi - lo), np.zeros(length - (hi - lo))]
        parts.append(_gather_rows(rows, index, weight, np.asarray(rows.unit)[index]))
    host = jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
    placed = place_stacked(mesh, host, n_blocks * length, stacked=False)
    return UnitRows(**placed, n_units=rows.n_units, n_blocks=n_blocks, mesh=mesh)


class RowBatch(AbstractUnitBatch):
    """A minibatch of whole units' rows (:class:`RowSampler`).

    Attributes:
        unit: ``[slot]`` global unit of each slot.
        weight: ``[slot]`` units in its block / units drawn from it; 0 for padding slots.
        rows: the slots' rows; ``rows.unit`` is the slot (``0 .. slots - 1``).
        n_units: units in the whole data set.
    """

    unit: Int[AnyArray, "*step slot"]
    weight: Float[AnyArray, "*step slot"]
    rows: UnitRows
    n_units: int = eqx.field(static=True)


class RowSampler(AbstractSampler):
    """Draws :class:`RowBatch` es of whole units from host :class:`UnitRows`.

    Uses the block plan :func:`shard_rows` would: step ``s`` draws, in block ``b``,
    ``per_block`` units without replacement (:func:`hbjax.parallel.blocks.draw_units`),
    so a step's batch is the same on any device count. Each block's slots get room for
    the rows of its ``per_block`` largest units; unused room is padding (weight 0).

    Args:
        rows: host rows.
        batch_size: units per step, rounded up to a multiple of the block count.
        mesh: the mesh; default all devices.
        n_blocks: number of blocks; default as :func:`shard_rows`.
        seed: sampling seed.

    Attributes:
        batch_size: the actual units per step.
        steps_per_epoch: ``n_units / batch_size``.
        bytes_per_step: bytes of one step's batch (the loop sizes its chunks by it).
    """

    def __init__(
        self,
        rows: UnitRows,
        batch_size: int,
        *,
        mesh: Mesh | None = None,
        n_blocks: int | None = None,
        seed: int = 0,
    ):
        if not isinstance(rows, UnitRows) or rows.mesh is not None:
            raise TypeError("RowSampler takes host UnitRows (UnitRows.build), not placed ones.")
        batch_size = checked_batch_size(batch_size, rows.n_units)
        self.rows, self.mesh = rows, make_mesh() if mesh is None else mesh
        self.n_blocks = checked_block_count(
            n_blocks or default_block_count(rows.n_units, 1, self.mesh.devices.size), self.mesh
        )
        unit_rows = rows.unit_rows
        self.units = plan_blocks(unit_rows, self.n_blocks)
        self.per_block = math.ceil(batch_size / self.n_blocks)
        self.batch_size = self.per_block * self.n_blocks
        self.steps_per_epoch = rows.n_units / self.batch_size
        self.seed, self.local = int(seed), local_blocks(self.mesh, self.n_blocks)
        self.starts = _unit_starts(unit_rows)
        largest = [
            np.sort(unit_rows[self.units[b] : self.units[b + 1]])[::-1][: self.per_block].sum()
            for b in range(self.n_blocks)
        ]
        self.capacity = int(max(max(largest, default=0), 1))
        row_bytes = 8 + sum(np.asarray(x)[:1].nbytes for x in jax.tree.leaves(rows.columns))
        self.bytes_per_step = self.n_blocks * (self.capacity * row_bytes + 8 * self.per_block)

    def host_batch(self, step: int) -> dict:
        """This process's slots and rows of step ``step``'s batch (host arrays)."""
        unit, weight = draw_units(self.units, self.local, self.per_block, self.seed, step)
        index, slot, row_weight = [], [], []
        for i, b in enumerate(self.local):
            picked = slice(i * self.per_block, (i + 1) * self.per_block)
            chosen = [(s, u) for s, u in enumerate(unit[picked]) if weight[picked][s] > 0]
            block_index = [np.arange(self.starts[u], self.starts[u + 1]) for _, u in chosen]
            block_slot = [np.full(len(r), s) for (s, _), r in zip(chosen, block_index, strict=True)]
            taken = np.concatenate(block_index or [np.zeros(0, np.int64)]).astype(np.int64)
            slots = np.concatenate(block_slot or [np.zeros(0, np.int64)]).astype(np.int64)
            pad = self.capacity - len(taken)
            last = taken[-1] if len(taken) else self.starts[self.units[b]]
            filler = min(int(last), max(len(self.rows.unit) - 1, 0))
            index.append(np.r_[taken, np.full(pad, filler)])
            # global slot numbers: block i's slots come after the earlier local blocks'
            first_slot = self.local[i] * self.per_block
            slot.append(np.r_[slots, np.full(pad, slots[-1] if len(slots) else 0)] + first_slot)
            row_weight.append(np.r_[np.ones(len(taken)), np.zeros(pad)])
        index = np.concatenate(index)
        rows = _gather_rows(self.rows, index, np.concatenate(row_weight), np.concatenate(slot))
        return {"unit": unit.astype(np.int32), "weight": weight, "rows": rows}

    def batches(self, first_step: int, count: int) -> RowBatch:
        """Steps ``first_step .. first_step + count - 1``: a batch with a leading step axis."""
        hosts = [self.host_batch(first_step + i) for i in range(count)]
        stacked = jax.tree.map(lambda *xs: np.stack(xs), *hosts)
        slots = place_stacked(
            self.mesh, {k: stacked[k] for k in ("unit", "weight")}, self.batch_size, stacked=True
        )
        total = self.n_blocks * self.capacity
        rows = place_stacked(self.mesh, stacked["rows"], total, stacked=True)
        return RowBatch(
            unit=slots["unit"],
            weight=slots["weight"],
            rows=UnitRows(**rows, n_units=self.batch_size, n_blocks=self.n_blocks, mesh=self.mesh),
            n_units=self.rows.n_units,
        )


class AbstractRowModel(AbstractUnitModel):
    """A hierarchical model of units whose likelihood is a sum over rows of data.

    Write the model's pieces; sharding, minibatching, block-ordered sums and unbiased
    batch weights come from hbjax:

    - :meth:`latent_shapes` and :meth:`unit_leaves` (each unit leaf ``[unit]``);
    - :meth:`shared_log_prior` (latents that are not per unit) and :meth:`unit_log_prior`
      (``[unit]``: each unit's prior given the shared latents);
    - :meth:`row_log_likelihood` (``[row]``: each row's log density, unweighted; index
      unit latents with ``rows.unit``);
    - :meth:`restrict` (the model of a batch's units: arrays indexed by unit taken at
      ``units``, so that slot ``j`` plays unit ``units[j]``).

    The data is :class:`UnitRows`.
    """

    @abc.abstractmethod
    def shared_log_prior(self, latents: PyTree[Float[Array, "..."]]) -> Scalar:
        """Log prior of the latents that are not per unit."""

    @abc.abstractmethod
    def unit_log_prior(self, latents: PyTree[Float[Array, "..."]]) -> Float[Array, " unit"]:
        """``[unit]`` each unit's own prior terms given the shared latents."""

    @abc.abstractmethod
    def row_log_likelihood(
        self, latents: PyTree[Float[Array, "..."]], rows: UnitRows
    ) -> Float[Array, " row"]:
        """``[row]`` each row's log density given the latents (unweighted)."""

    @abc.abstractmethod
    def restrict(self, units: Int[Array, " slot"]) -> AbstractRowModel:
        """This model for a batch: whatever is indexed by unit, taken at ``units``."""

    def log_prior(self, latents: PyTree[Float[Array, "..."]]) -> Scalar:
        """Shared prior plus every unit's."""
        return self.shared_log_prior(latents) + jnp.sum(self.unit_log_prior(latents))

    def log_likelihood(self, latents: PyTree[Float[Array, "..."]], panel: UnitRows) -> Scalar:
        """``sum(weight * row_log_likelihood)``: per block, then over blocks in order."""
        return row_total(self, latents, panel)

    def batch_log_joint(self, latents: PyTree[Float[Array, "..."]], batch: RowBatch) -> Scalar:
        """Shared prior + the slots' prior and rows, each weighted by its slot's weight."""
        model = self.restrict(batch.unit)
        unit_terms = jnp.sum(batch.weight * model.unit_log_prior(latents))
        rows = batch.rows
        return (
            self.shared_log_prior(latents)
            + unit_terms
            + row_total(model, latents, rows, slot_weight=batch.weight)
        )

    def slot_log_joint(
        self, latents: PyTree[Float[Array, "..."]], batch: RowBatch
    ) -> Float[Array, " slot"]:
        """Each slot's prior and rows, unweighted (host-sized batches)."""
        model = self.restrict(batch.unit)
        rows = batch.rows
        per_row = rows.weight * model.row_log_likelihood(latents, rows)
        slots = batch.unit.shape[-1]
        return model.unit_log_prior(latents) + jax.ops.segment_sum(per_row, rows.unit, slots)


def row_total(
    model: AbstractRowModel,
    latents: PyTree[Float[Array, "..."]],
    rows: UnitRows,
    *,
    slot_weight: Float[Array, " slot"] | None = None,
) -> Scalar:
    """``sum_r w_r * model.row_log_likelihood(latents, rows)[r]``, block-ordered when placed.

    ``w_r`` is the row's weight, times its slot's ``slot_weight`` in a minibatch. Placed
    rows are summed per block on their device, then over blocks in block order; the
    gradient's shared leaves likewise (per-block partials, gathered and summed in order)
    and its unit leaves by adding each block's own units (disjoint: exact). Values and
    gradients are then the same on any number of devices.
    """
    if rows.mesh is None:
        return jnp.sum(_row_terms(model, latents, rows, slot_weight))
    return _blocked_total(latents, model, rows, slot_weight)


def _row_terms(
    model: AbstractRowModel, latents: PyTree, rows: UnitRows, slot_weight: Array | None
) -> Float[Array, " row"]:
    weight = rows.weight if slot_weight is None else rows.weight * slot_weight[rows.unit]
    terms = model.row_log_likelihood(latents, rows)
    return jnp.where(weight > 0, weight * terms, 0.0)  # padding adds exact zeros


def _per_block(model: AbstractRowModel, latents: PyTree, rows: UnitRows, slot_weight: Array | None):  # noqa: ANN202
    """``[local block]`` sums of this device's rows (inside shard_map)."""
    terms = _row_terms(model, latents, rows, slot_weight)
    per_device = rows.n_blocks // rows.mesh.devices.size
    return jnp.sum(terms.reshape(per_device, -1), axis=1)


@eqx.filter_custom_vjp
def _blocked_total(latents, model, rows, slot_weight):  # noqa: ANN001, ANN202
    return _blocked_forward(latents, model, rows, slot_weight)


def _blocked_forward(latents, model, rows, slot_weight):  # noqa: ANN001, ANN202
    model_arrays, model_static = eqx.partition(model, eqx.is_array)
    row_arrays, row_static = eqx.partition(rows, eqx.is_array)

    def local(latents, model_arrays, row_arrays, slot_weight):  # noqa: ANN001, ANN202
        model = eqx.combine(model_arrays, model_static)
        rows = eqx.combine(row_arrays, row_static)
        return sum_over_blocks(_per_block(model, latents, rows, slot_weight))

    return jax.shard_map(
        local,
        mesh=rows.mesh,
        in_specs=(P(), P(), P(DATA_AXIS), P()),
        out_specs=P(),
    )(latents, model_arrays, row_arrays, slot_weight)


@_blocked_total.def_fwd
def _blocked_fwd(perturbed, latents, model, rows, slot_weight):  # noqa: ANN001, ANN202
    del perturbed
    return _blocked_forward(latents, model, rows, slot_weight), None


@_blocked_total.def_bwd
def _blocked_bwd(residuals, cotangent, perturbed, latents, model, rows, slot_weight):  # noqa: ANN001, ANN202
    del residuals, perturbed
    model_arrays, model_static = eqx.partition(model, eqx.is_array)
    row_arrays, row_static = eqx.partition(rows, eqx.is_array)
    unit_flags = model.unit_leaves()
    flags = jax.tree.structure(latents).flatten_up_to(unit_flags)

    def local(latents, model_arrays, row_arrays, slot_weight):  # noqa: ANN001, ANN202
        model = eqx.combine(model_arrays, model_static)
        rows = eqx.combine(row_arrays, row_static)
        per_device = rows.n_blocks // rows.mesh.devices.size
        blocks = jax.tree.map(lambda x: x.reshape(per_device, -1, *x.shape[1:]), row_arrays)
        # varying over devices: a gradient with respect to a replicated value would be
        # psum-ed across devices here, before the ordered sums below
        latents = jax.tree.map(lambda x: jax.lax.pcast(x, DATA_AXIS, to="varying"), latents)
        leaves, treedef = jax.tree.flatten(latents)

        def one_block(units_sum, block_arrays):  # noqa: ANN001, ANN202
            block = eqx.combine(block_arrays, row_static)

            def total(z):  # noqa: ANN001, ANN202
                return jnp.sum(_row_terms(model, z, block, slot_weight))

            grads = jax.tree.leaves(jax.grad(total)(latents))
            own = [g for g, f in zip(grads, flags, strict=True) if f]
            units_sum = [s + g for s, g in zip(units_sum, own, strict=True)]
            shared = [g for g, f in zip(grads, flags, strict=True) if not f]
            return units_sum, shared

        start = [jnp.zeros_like(x) for x, f in zip(leaves, flags, strict=True) if f]
        units_sum, shared = jax.lax.scan(one_block, start, blocks)
        # one collective for every leaf of a kind (joined, then cut): a collective per
        # leaf was a kernel per leaf to compile and, across processes, a round trip each
        # unit leaves: each unit's rows lie in one block, so adding devices is exact
        if units_sum:
            flat, unravel = ravel_pytree(units_sum)
            units_sum = unravel(jax.lax.psum(flat, DATA_AXIS))
        if shared:  # [block, ...] each: raveled per block, summed over blocks in order
            unravel = ravel_pytree([s[0] for s in shared])[1]
            shared = unravel(sum_over_blocks(jax.vmap(lambda t: ravel_pytree(t)[0])(shared)))
        it_units, it_shared = iter(units_sum), iter(shared)
        grads = [next(it_units) if f else next(it_shared) for f in flags]
        return jax.tree.unflatten(treedef, grads)

    grads = jax.shard_map(
        local,
        mesh=rows.mesh,
        in_specs=(P(), P(), P(DATA_AXIS), P()),
        out_specs=P(),
    )(latents, model_arrays, row_arrays, slot_weight)
    return jax.tree.map(lambda g: cotangent * g, grads)


__all__ = ["AbstractRowModel", "RowBatch", "RowSampler", "UnitRows", "row_total", "shard_rows"]
