"""A panel's arrays, ready for devices: :class:`Panel` (rows) and :class:`DensePanel` (grid).

No pandas here: tables become panels in :mod:`hbjax.data`, which re-exports both.
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ._types import AnyArray, Array, Bool, Float, Int, ObsFloat, ObsInt, UnitInt
from .parallel.host import AbstractHostData, AbstractSampler
from .vi.model import AbstractUnitBatch


class Panel(AbstractHostData):
    """Observation arrays of a unit × period panel, ready to go to devices.

    Rows are sorted by unit then period, so each unit's rows are contiguous. Padding rows
    (added by :mod:`hbjax.sharding`) carry ``weight == 0`` and valid indices, never a
    sentinel, so they change no sum.

    Attributes:
        unit_idx: unit of each row, in ``[0, n_units)``.
        cell_idx: (group, period) cell of each row, ``group * n_periods + period``.
        log_price: natural log of the price.
        counts: observed units sold (float32; exact below 2**24).
        weight: 1.0 for observed rows, 0.0 for padding.
        unit_group: group of each unit, in ``[0, n_groups)``.
        unit_rows: observed rows of each unit in the whole table (also when this panel holds
            one process's slice of it): the data's shape, from which blocks are planned.
        n_units: number of units.
        n_groups: number of groups.
        n_periods: number of periods.
        n_blocks: the rows form this many equal-length blocks of whole units (set by
            :func:`hbjax.sharding.shard_panel`; a reading plan may set it beforehand).
        mesh: the device mesh the blocks are split over (set by
            :func:`hbjax.sharding.shard_panel`); ``None`` for an unsharded panel.
    """

    unit_idx: ObsInt
    cell_idx: ObsInt
    log_price: ObsFloat
    counts: ObsFloat
    weight: ObsFloat
    unit_group: UnitInt
    unit_rows: UnitInt
    n_units: int = eqx.field(static=True)
    n_groups: int = eqx.field(static=True)
    n_periods: int = eqx.field(static=True)
    n_blocks: int | None = eqx.field(static=True, default=None)
    mesh: Mesh | None = eqx.field(static=True, default=None)

    @property
    def n_rows(self) -> int:
        """Number of rows including padding."""
        return int(self.unit_idx.shape[0])

    @property
    def n_cells(self) -> int:
        """Number of (group, period) cells."""
        return self.n_groups * self.n_periods

    def unit_moments(self) -> Float[Array, "5 unit"]:
        """Per-unit sums for a weighted regression of log demand on log price.

        With ``w = counts + 1/2``, ``x = log price``, ``l = log w``: the sums of
        ``w, w x, w x^2, w l, w x l`` over each unit's rows (padding excluded).
        """
        return _unit_moments(
            jnp.asarray(self.unit_idx),
            jnp.asarray(self.log_price),
            jnp.asarray(self.counts),
            jnp.asarray(self.weight),
            self.n_units,
        )

    def place(self, mesh: Mesh | None, layout: object = "auto") -> tuple[Panel, Mesh]:
        """:func:`hbjax.shard_panel` on ``mesh`` (default: one device) in ``layout``."""
        from .sharding import make_mesh, shard_panel  # placement imports this module

        mesh = make_mesh(1) if mesh is None else mesh
        return shard_panel(self, mesh, layout=layout), mesh

    def sampler(self, batch_size: int, mesh: Mesh | None, seed: int) -> AbstractSampler:
        """A :class:`hbjax.UnitSampler` of ``batch_size`` units per step."""
        from .minibatch import UnitSampler  # it imports this module

        return UnitSampler(self, batch_size, mesh=mesh, seed=seed)

    def unit_batch(self, units: Int[np.ndarray, " slot"]) -> AbstractUnitBatch:
        """:func:`hbjax.minibatch.unit_batch`: the units' rows as one unplaced batch."""
        from .minibatch import unit_batch

        return unit_batch(self, units)


@functools.partial(jax.jit, static_argnames="n_units")
def _unit_moments(
    unit_idx: Int[Array, " obs"],
    log_price: Float[Array, " obs"],
    counts: Float[Array, " obs"],
    weight: Float[Array, " obs"],
    n_units: int,
) -> Float[Array, "5 unit"]:
    w = weight * (counts + 0.5)
    log_w = jnp.log(counts + 0.5)
    terms = jnp.stack([w, w * log_price, w * log_price**2, w * log_w, w * log_price * log_w])
    return jax.vmap(lambda t: jax.ops.segment_sum(t, unit_idx, n_units))(terms)


class DensePanel(eqx.Module):
    """A panel as a dense [unit slot, period] grid with a mask: the fast layout.

    Built by :func:`hbjax.sharding.shard_panel` (``layout="dense"``) from a
    :class:`Panel`. Units are cut into ``n_blocks`` blocks of whole units, each padded to
    the same number of *slots* (padding slots observe nothing). The Poisson likelihood's
    linear term ``sum y * log_rate`` is linear in the parameters, so it is computed from
    per-unit and per-cell sufficient statistics, once; only ``sum exp(log_rate)`` touches
    the grid each step, with no index gathers along the rows.

    Attributes:
        log_price: ``[slot, period]`` log price minus the unit's ``grid_centre`` (0 where
            not observed): centred once here, so the kernel needs no per-cell subtraction.
        observed: ``[slot, period]`` whether the cell was observed.
        slot_unit: ``[slot]`` unit of each slot (padding: a unit of the same block).
        slot_group: ``[slot]`` group of each slot.
        unit_group: ``[unit]`` group of each unit.
        unit_rows: ``[unit]`` observed periods of each unit.
        counts_by_unit: ``[unit]`` sum of counts.
        counts_log_price_by_unit: ``[unit]`` sum of counts * (log price - grid_centre).
        grid_centre: ``[unit]`` demand-weighted mean log price (the default model's price
            centre, :func:`hbjax.model.unit_price_centres`).
        moments_by_unit: ``[5, unit]`` regression sums (see :meth:`Panel.unit_moments`).
        counts_by_cell: ``[cell]`` sum of counts of each (group, period) cell.
        log_factorial: ``[]`` sum of log(counts!) (a constant of the likelihood).
        n_units: number of units.
        n_groups: number of groups.
        n_periods: number of periods.
        n_blocks: number of blocks.
        cell_chunk: slots per chunk: each block's run of each group's units fills whole
            chunks (:func:`hbjax.parallel.blocks.slot_plan`), so cell sums add chunks first.
        mesh: the mesh the slots are split over, or ``None``.
    """

    log_price: Float[AnyArray, "slot period"]
    observed: Bool[AnyArray, "slot period"]
    slot_unit: Int[AnyArray, " slot"]
    slot_group: Int[AnyArray, " slot"]
    unit_group: UnitInt
    unit_rows: UnitInt
    counts_by_unit: Float[AnyArray, " unit"]
    counts_log_price_by_unit: Float[AnyArray, " unit"]
    grid_centre: Float[AnyArray, " unit"]
    moments_by_unit: Float[AnyArray, "5 unit"]
    counts_by_cell: Float[AnyArray, " cell"]
    log_factorial: Float[AnyArray, ""]
    n_units: int = eqx.field(static=True)
    n_groups: int = eqx.field(static=True)
    n_periods: int = eqx.field(static=True)
    n_blocks: int = eqx.field(static=True, default=1)
    cell_chunk: int = eqx.field(static=True, default=1)
    mesh: Mesh | None = eqx.field(static=True, default=None)

    @property
    def n_cells(self) -> int:
        """Number of (group, period) cells."""
        return self.n_groups * self.n_periods

    def unit_moments(self) -> Float[Array, "5 unit"]:
        """Per-unit regression sums, as :meth:`Panel.unit_moments` (computed once)."""
        return jnp.asarray(self.moments_by_unit)


__all__ = ["DensePanel", "Panel"]
