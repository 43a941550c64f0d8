"""A count regression on a [unit slot, period] grid: its fast, dense layout.

When each unit has at most one row per period and every effect's cell is set by the
period and a label of the unit (category x week: the category is the unit's), the rows fit
on a grid of unit slots by periods. Then the linear predictor is

    eta[s, t] = a[u] + sum_k b_k[u] x_k[s, t] + sum_e G_e[key_e[s], t] + offset[s, t]

with ``u`` the slot's unit and ``G_e`` effect ``e`` laid on ``[key, period]``: no per-row
index is read, and the likelihood and its gradient come from one pass over the grid
(a custom VJP whose residuals are per-unit and per-cell sums, as the article model's
dense kernel). For a Poisson likelihood the ``y * eta`` part comes from sufficient
statistics, so only ``exp(eta)`` touches the grid; other likelihoods read the counts
there and differentiate each cell's term in place.

Like every placed layout, the units are cut into blocks (:func:`hbjax.parallel.blocks.
plan_blocks`) and the shared sums are added per block, then over blocks in order: the
same value and gradient on any device count that divides the blocks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int, PyTree, Scalar

from .._types import AnyArray, float_dtype
from ..parallel.blocks import (
    DATA_AXIS,
    checked_block_count,
    chunk_sums,
    default_block_count,
    default_cell_chunk,
    local_blocks,
    per_block_segment_sum,
    plan_blocks,
    slot_plan,
    sum_over_blocks,
)
from ..parallel.rows import UnitRows, place_stacked
from ..vi.devices import replicate
from ..vi.host import AbstractPlacedData
from .families import AbstractCountLikelihood, Poisson

if TYPE_CHECKING:
    from .regression import CountLatents, CountRegression


class GridError(ValueError):
    """These rows do not fit the grid; the message says why (the rows layout still works)."""


class CountGrid(AbstractPlacedData):
    """A count regression's rows placed on a ``[slot, period]`` grid (see the module doc).

    Attributes:
        x: per covariate, ``(x - c_u) / s`` (the unit's centre, the column's sd:
            :meth:`~hbjax.counts.CountRegression.standardised`) where observed, 0 elsewhere.
        offset: the offset column on the grid, or ``None``.
        counts: the counts on the grid (``None`` for a Poisson likelihood, which needs
            only sufficient statistics).
        observed: where a row is.
        slot_unit: ``[slot]`` each slot's unit (padding slots: a unit of their block).
        slot_key: per effect, ``[slot]`` the row of ``cell_table`` of the slot's unit.
        cell_table: per effect, ``[key, period]`` the effect's cell (``n_cells``: none);
            ``None`` where cell ``key * periods + period`` is the effect's own order.
        counts_by_unit: ``[unit]`` ``sum y`` per unit.
        counts_x_by_unit: per covariate, ``[unit]`` ``sum y (x - c_u) / s``.
        counts_by_cell: per effect, ``[cell]`` ``sum y`` per cell.
        constant: ``sum y * offset - sum log y!`` (Poisson), ``- sum log y!`` (others).
        n_units: units.
        n_blocks: blocks of whole units.
        cell_chunk: per effect, slots summed together before its per-cell scatter (1:
            none). The slots go by the first effect's key, each run of a key padded to
            whole chunks (:func:`~hbjax.parallel.blocks.slot_plan`); an effect whose key
            varies within a chunk (a finer one) scatters every slot.
        mesh: the mesh the grid is placed on.
    """

    x: dict[str, Float[AnyArray, "slot period"]]
    offset: Float[AnyArray, "slot period"] | None
    counts: Float[AnyArray, "slot period"] | None
    observed: Bool[AnyArray, "slot period"]
    slot_unit: Int[AnyArray, " slot"]
    slot_key: dict[str, Int[AnyArray, " slot"]]
    cell_table: dict[str, Int[AnyArray, "key period"] | None]
    counts_by_unit: Float[AnyArray, " unit"]
    counts_x_by_unit: dict[str, Float[AnyArray, " unit"]]
    counts_by_cell: dict[str, Float[AnyArray, " cell"]]
    constant: Float[AnyArray, ""]
    n_units: int = eqx.field(static=True)
    n_blocks: int = eqx.field(static=True)
    cell_chunk: dict[str, int] = eqx.field(static=True)
    mesh: Mesh = eqx.field(static=True)


def effect_keys(
    model: CountRegression, rows: UnitRows, period: Int[np.ndarray, " row"], n_periods: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per effect, ``([unit] key, [key, period] cell table)``: each cell as (key, period).

    The key is the coarsest of: one for all units, a group level of the model's table, the
    unit itself (which always fits when a unit has one row per period).
    """
    unit = np.asarray(rows.unit)
    candidates = [np.zeros(model.n_units, np.int64)]
    candidates += [np.asarray(v, np.int64) for v in reversed(model.table.levels.values())]
    candidates.append(np.arange(model.n_units))
    out = {}
    for name, effect in model.effects.items():
        cells = np.asarray(rows.columns["cells"][name], np.int64)
        for key in candidates:
            n_keys = int(key.max(initial=0)) + 1
            pair = key[unit] * n_periods + period
            table = np.full(n_keys * n_periods, effect.shape[0], np.int64)
            table[pair] = cells
            if np.array_equal(table[pair], cells):
                out[name] = (key.astype(np.int32), table.reshape(n_keys, n_periods))
                break
    return out


def place_grid(
    model: CountRegression,
    rows: UnitRows,
    period: Int[np.ndarray, " row"],
    n_periods: int,
    mesh: Mesh,
    *,
    n_blocks: int | None = None,
    cell_chunk: int | None = None,
) -> CountGrid:
    """Place host ``rows`` of ``model`` on ``mesh`` as a grid of ``[slot, period]``.

    Args:
        model: the model (its table gives the centres and the group levels).
        rows: host rows (:func:`hbjax.counts.from_frame`'s), all of weight 1.
        period: ``[row]`` each row's period, ``0 .. n_periods - 1``.
        n_periods: periods.
        mesh: a one-axis ``"data"`` mesh.
        n_blocks: blocks of whole units (default
            :func:`~hbjax.parallel.blocks.default_block_count`).
        cell_chunk: slots summed together before the per-cell scatter of the effects (see
            :class:`CountGrid`); default
            :func:`~hbjax.parallel.blocks.default_cell_chunk` for the mesh's backend (1 on
            CPU: none; on a GPU up to 64, fewer atomic adds onto few cells).

    Raises:
        GridError: two rows of one unit in one period, or a clipped log rate.
    """
    if rows.mesh is not None:
        raise GridError("place_grid takes host rows, once.")
    if model.clip_log_rate is not None:
        raise GridError(
            "a clipped log rate is not linear in the latents, so the grid cannot take it; "
            "fit the rows (layout='rows')."
        )
    unit, period = np.asarray(rows.unit, np.int64), np.asarray(period, np.int64)
    n_units = model.n_units
    pair = unit * n_periods + period
    if len(np.unique(pair)) != len(pair):
        raise GridError("a unit has two rows in one period; the grid holds one per period.")
    keys = effect_keys(model, rows, period, n_periods)
    partials = sum(t.size for _, t in keys.values())
    if n_blocks is None:
        n_blocks = default_block_count(n_units, partials, mesh.devices.size)
    n_blocks = checked_block_count(n_blocks, mesh)
    unit_rows = np.bincount(unit, minlength=n_units)
    units = plan_blocks(unit_rows, n_blocks)
    first_key = next(iter(keys.values()))[0] if keys else np.zeros(n_units, np.int32)
    if cell_chunk is None:
        cell_chunk = default_cell_chunk(first_key, units, mesh.devices.flat[0].platform)
    slots, slot_of_unit, block_slot_unit = slot_plan(first_key, units, cell_chunk)
    block_of_unit = np.repeat(np.arange(n_blocks), np.diff(units))
    local = local_blocks(mesh, n_blocks)
    position = np.full(n_blocks, -1, np.int64)
    position[local] = np.arange(len(local))
    row_block = position[block_of_unit[unit]]
    mine = row_block >= 0  # this process's rows
    slot = row_block[mine] * slots + slot_of_unit[unit[mine]]
    t = period[mine]
    columns, floats = rows.columns, float_dtype()

    def on_grid(values: np.ndarray, dtype: type | np.dtype = floats) -> np.ndarray:
        grid = np.zeros((len(local) * slots, n_periods), dtype)
        grid[slot, t] = np.asarray(values)[mine]
        return grid

    counts = np.asarray(columns["counts"], np.float64)
    centred = {  # CountRegression.standardised in float64 on the host
        k: (np.asarray(columns["x"][k], np.float64) - np.asarray(model.centre(k))[unit])
        / model.spread[k]
        for k in model.slopes
    }
    slot_unit = block_slot_unit[local].reshape(-1)
    host = {
        "x": {k: on_grid(v) for k, v in centred.items()},
        "observed": on_grid(np.ones(len(unit), bool), bool),
        "slot_unit": slot_unit.astype(np.int32),
        "slot_key": {e: k[slot_unit].astype(np.int32) for e, (k, _) in keys.items()},
    }
    chunks = {e: k.reshape(-1, cell_chunk) for e, k in host["slot_key"].items()}
    whole = {e: bool(np.all(c == c[:, :1])) for e, c in chunks.items()}
    effect_chunk = _all_processes({e: cell_chunk if ok else 1 for e, ok in whole.items()})
    if "offset" in columns:
        host["offset"] = on_grid(columns["offset"])
    poisson = isinstance(model.likelihood, Poisson) and model.zero_inflation is None
    if not poisson:
        host["counts"] = on_grid(counts)
    placed = place_stacked(mesh, host, n_blocks * slots, stacked=False)
    constant = -np.sum(np.asarray(columns["log_factorial"], np.float64))
    if poisson and "offset" in columns:
        constant += np.sum(counts * np.asarray(columns["offset"], np.float64))
    stats = {
        "cell_table": {
            e: _table_or_none(t, model.effects[e].shape[0]) for e, (_, t) in keys.items()
        },
        "counts_by_unit": np.bincount(unit, counts, n_units).astype(floats),
        "counts_x_by_unit": {
            k: np.bincount(unit, counts * v, n_units).astype(floats) for k, v in centred.items()
        },
        "counts_by_cell": {
            e: np.bincount(
                np.asarray(columns["cells"][e]), counts, int(model.effects[e].shape[0])
            ).astype(floats)
            for e in model.effects
        },
        "constant": np.asarray(constant, floats),
    }
    return CountGrid(
        **{"offset": None, "counts": None, **placed},
        **replicate(stats, mesh),
        n_units=n_units,
        n_blocks=n_blocks,
        cell_chunk=effect_chunk,
        mesh=mesh,
    )


def _all_processes(effect_chunk: dict[str, int]) -> dict[str, int]:
    """Each effect's chunk where every process's slots allow it, else 1 (one program)."""
    if jax.process_count() == 1:
        return effect_chunk
    values = np.asarray(list(effect_chunk.values()), np.int32)
    lowest = np.min(multihost_utils.process_allgather(values), axis=0)
    return dict(zip(effect_chunk, (int(v) for v in lowest), strict=True))


def _table_or_none(table: np.ndarray, n_cells: int) -> np.ndarray | None:
    """``None`` for the identity table (cells already ``key * periods + period``).

    Only when every (key, period) pair is a cell: a table whose last pair has no cell
    points it at ``n_cells`` (the zero appended to the values), which is not the identity.
    """
    if table.size == n_cells and np.array_equal(table.ravel(), np.arange(table.size)):
        return None
    return table.astype(np.int32)


def _on_grid(values: Float[Array, " cell"], table: Array | None, n_periods: int) -> Array:
    """An effect's cell values laid on ``[key, period]`` (0 where a pair has no cell)."""
    if table is None:  # a reshape, not a gather XLA would redo in every grid cell
        return values.reshape(-1, n_periods)
    return jnp.append(values, 0.0)[table]


def grid_log_likelihood(model: CountRegression, latents: CountLatents, grid: CountGrid) -> Scalar:
    """The model's log-likelihood of the rows on ``grid`` (equal to the rows layout's)."""
    effects = model.effect_values(latents)
    n_periods = grid.observed.shape[1]
    params = {
        "a": model.intercept_values(latents),
        "b": model.standard_slopes(latents),
        "g": {e: _on_grid(g, grid.cell_table[e], n_periods) for e, g in effects.items()},
    }
    poisson = grid.counts is None
    if not poisson:
        parameter = model.log_dispersion(latents)
        if parameter is not None:
            if model.dispersion_level is not None:
                parameter = parameter[model.table.levels[model.dispersion_level]]
            params["p"] = jnp.broadcast_to(parameter, (model.n_units,))
        if model.zero_inflation is not None:
            params["w"] = model.zero_inflation(latents.zero_inflation)
    total = _grid_total(params, grid, None if poisson else model.likelihood)
    if not poisson:
        return total + grid.constant
    linear = jnp.dot(params["a"], grid.counts_by_unit) + grid.constant
    for k, b in params["b"].items():
        linear = linear + jnp.dot(b, grid.counts_x_by_unit[k])
    for e, g in effects.items():
        linear = linear + jnp.dot(g, grid.counts_by_cell[e])
    return linear + total


#: the grid's arrays split over devices (the rest is replicated)
_SHARDED = ("x", "offset", "counts", "observed", "slot_unit", "slot_key")


def _cell_terms(
    params: dict, grid: dict, likelihood: AbstractCountLikelihood | None
) -> tuple[Float[Array, "slot period"], dict, float]:
    """Each cell's term and its derivatives with respect to the slot's parameters.

    ``grid``: this device's :data:`_SHARDED` arrays. Derivatives: ``"eta"`` per cell,
    ``"p"`` and ``"w"`` per slot (summed over its periods). Unobserved cells give 0. The
    terms and derivatives are ``sign`` (the last output) times the arrays returned.
    """
    su, observed = grid["slot_unit"], grid["observed"]
    eta = jnp.broadcast_to(params["a"][su][:, None], observed.shape)
    for k, b in params["b"].items():
        eta = eta + b[su][:, None] * grid["x"][k]
    for e, table in params["g"].items():
        eta = eta + table[grid["slot_key"][e]]
    if grid["offset"] is not None:
        eta = eta + grid["offset"]
    if likelihood is None:  # Poisson: -exp(eta); y * eta is in the sufficient statistics
        rate = jnp.where(observed, jnp.exp(eta), 0.0)
        return rate, {"eta": rate}, -1.0  # the sign applied to the sums, not to every cell
    counts = grid["counts"]
    slots = (observed.shape[0], 1)
    p = jnp.broadcast_to(params["p"][su][:, None], slots) if "p" in params else None
    w = None
    if "w" in params:  # varying: the vjp of a replicated input would psum over devices
        w = jnp.broadcast_to(jax.lax.pcast(params["w"], DATA_AXIS, to="varying"), slots)

    def term(eta: Array, p: Array | None, w: Array | None) -> Array:
        log_p = likelihood.log_kernel(eta, counts, p)
        if w is None:
            return log_p
        log_zero, log_count = jax.nn.log_sigmoid(w), jax.nn.log_sigmoid(-w)
        return jnp.where(counts > 0, log_count + log_p, jnp.logaddexp(log_zero, log_count + log_p))

    values, vjp = jax.vjp(term, eta, p, w)
    d_eta, d_p, d_w = vjp(observed.astype(values.dtype))
    derivatives = {"eta": d_eta}
    if p is not None:
        derivatives["p"] = d_p[:, 0]
    if w is not None:
        derivatives["w"] = d_w[:, 0]
    return jnp.where(observed, values, 0.0), derivatives, 1.0


def _block_partials(
    params: dict,
    arrays: dict,
    likelihood: AbstractCountLikelihood | None,
    n_blocks: int,
    cell_chunk: dict[str, int],
) -> tuple[dict, float]:
    """What the value and gradient need from ``n_blocks`` consecutive blocks of slots.

    Per block: the sum of the terms (``"value"``), the per-key effect sums (``"g"``) and
    the zero-inflation derivative (``"w"``); per slot: the intercept's, slopes' and
    dispersion's derivatives (``"a"``, ``"b"``, ``"p"``). All times ``sign`` (returned).
    An effect's sums add each chunk of ``cell_chunk[effect]`` slots (one key) first.
    """
    terms, d, sign = _cell_terms(params, arrays, likelihood)
    d_eta = d["eta"]

    def per_block(per_slot: Array) -> Array:
        return jnp.sum(per_slot.reshape(n_blocks, -1, *per_slot.shape[1:]), 1)

    out = {
        "value": per_block(jnp.sum(terms, axis=1)),
        "a": jnp.sum(d_eta, axis=1),
        "b": {k: jnp.sum(d_eta * arrays["x"][k], axis=1) for k in params["b"]},
        "g": {
            e: per_block_segment_sum(
                *chunk_sums(d_eta, arrays["slot_key"][e], cell_chunk[e]),
                n_blocks,
                table.shape[0],
                indices_are_sorted=i == 0,  # the slots go by the first effect's key
            )
            for i, (e, table) in enumerate(params["g"].items())
        },
    }
    if "p" in params:
        out["p"] = d["p"]
    if "w" in params:
        out["w"] = per_block(d["w"])
    return out, sign


@eqx.filter_custom_vjp
def _grid_total(
    params: dict, grid: CountGrid, likelihood: AbstractCountLikelihood | None
) -> Scalar:
    return _grid_forward(params, grid, likelihood)[0]


def _grid_forward(params: dict, grid: CountGrid, likelihood: Any) -> tuple[Scalar, PyTree]:
    """The sum over the grid and its gradient with respect to ``params``, in one pass.

    Per-unit gradients add each unit's one slot (exact across devices); the value and the
    shared gradients are summed per block, then over blocks in order: for the Poisson
    likelihood the same bits on any device count >= 2 that divides the blocks. Other
    likelihoods agree across device counts to float32 rounding only (1e-7 relative): XLA
    compiles their per-cell logs and log-gammas differently for each device's array
    length, and a loop over blocks, which would fix the shape, halves their speed.
    """
    n_units, n_blocks, mesh = grid.n_units, grid.n_blocks, grid.mesh
    per_device = n_blocks // mesh.devices.size

    def local(params: dict, arrays: dict) -> tuple[Scalar, PyTree]:
        parts, sign = _block_partials(params, arrays, likelihood, per_device, grid.cell_chunk)
        su = arrays["slot_unit"]

        def by_unit(per_slot: Array) -> Array:
            return sign * jax.lax.psum(jax.ops.segment_sum(per_slot, su, n_units), DATA_AXIS)

        def by_block(partials: Array) -> Array:
            return sign * sum_over_blocks(partials)

        grads = {
            "a": by_unit(parts["a"]),
            "b": {k: by_unit(v) for k, v in parts["b"].items()},
            "g": {e: by_block(parts["g"][e]).reshape(t.shape) for e, t in params["g"].items()},
        }
        if "p" in params:
            grads["p"] = by_unit(parts["p"])
        if "w" in params:
            grads["w"] = by_block(parts["w"])
        return by_block(parts["value"]), grads

    arrays = {k: getattr(grid, k) for k in _SHARDED}
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=(P(), P()))(
        params, arrays
    )


@_grid_total.def_fwd
def _grid_fwd(perturbed: Any, params: dict, grid: CountGrid, likelihood: Any) -> tuple:
    del perturbed
    return _grid_forward(params, grid, likelihood)


@_grid_total.def_bwd
def _grid_bwd(
    residuals: PyTree,
    cotangent: Scalar,
    perturbed: Any,
    params: dict,
    grid: CountGrid,
    likelihood: Any,
) -> PyTree:
    del perturbed, params, grid, likelihood
    return jax.tree.map(lambda g: cotangent * g, residuals)


__all__ = [
    "CountGrid",
    "GridError",
    "effect_keys",
    "grid_log_likelihood",
    "place_grid",
]
