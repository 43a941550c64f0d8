"""The log-likelihood kernels of the elasticity model (Poisson or negative binomial).

:func:`elasticity_log_likelihood` is a plain function of *one shard* of observation rows
and replicated parameters: sum it over shards and you get the full log-likelihood. Rows
with ``weight == 0`` (padding) contribute exactly nothing. It knows nothing of meshes.
:func:`panel_log_likelihood` runs it on a whole panel: directly, or, for a panel placed on
a mesh by :func:`hbjax.sharding.shard_panel`, under ``jax.shard_map`` over ``"data"`` with
the parameters replicated and the partial sums combined by ``psum``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.scipy.special import gammaln
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ._types import Array, Bool, CellFloat, Float, Int, ObsFloat, ObsInt, Scalar, UnitFloat
from .families import AbstractCountLikelihood, Poisson
from .panel import DensePanel, Panel
from .parallel.blocks import DATA_AXIS, chunk_sums, per_block_segment_sum
from .parallel.blocks import sum_over_blocks as _sum_over_blocks


def poisson_log_likelihood(log_rate: ObsFloat, counts: ObsFloat, weight: ObsFloat) -> Scalar:
    """``sum_n weight_n * log Poisson(counts_n | exp(log_rate_n))``.

    Args:
        log_rate: log of the Poisson mean of each row.
        counts: observed counts.
        weight: 1 for observed rows, 0 for padding (any non-negative weight is allowed).
    """
    log_pmf = Poisson().log_kernel(log_rate, counts) - gammaln(counts + 1.0)
    return jnp.sum(weight * log_pmf)


def elasticity_log_rate(
    unit_elasticity: UnitFloat,
    unit_effect: UnitFloat,
    cell_effect: CellFloat,
    unit_idx: ObsInt,
    cell_idx: ObsInt,
    log_price: ObsFloat,
    clip: tuple[float, float] | None = None,
    price_centre: UnitFloat | None = None,
) -> ObsFloat:
    """``elasticity[unit] * log_price + effect[unit] + cell_effect[cell]`` for each row.

    ``clip=(lo, hi)`` clips the log-rate as the article does (``(-4, 20)``); gradients are
    then zero outside the range. ``price_centre`` (per unit) replaces ``log_price`` by
    ``log_price - price_centre[unit]`` (the intercept is then the one at the centre).
    """
    if price_centre is not None:
        log_price = log_price - price_centre[unit_idx]
    log_rate = unit_elasticity[unit_idx] * log_price + unit_effect[unit_idx] + cell_effect[cell_idx]
    if clip is not None:
        log_rate = jnp.clip(log_rate, clip[0], clip[1])
    return log_rate


def elasticity_log_likelihood(
    unit_elasticity: UnitFloat,
    unit_effect: UnitFloat,
    cell_effect: CellFloat,
    unit_idx: ObsInt,
    cell_idx: ObsInt,
    log_price: ObsFloat,
    counts: ObsFloat,
    weight: ObsFloat,
    clip: tuple[float, float] | None = None,
    price_centre: UnitFloat | None = None,
    family: AbstractCountLikelihood | None = None,
    parameter: Array | None = None,
) -> Scalar:
    """Log-likelihood of one shard of rows (the per-shard kernel).

    Parameters (first three) are natural-scale and replicated; the rest are the shard's
    rows. Returns the shard's partial sum. ``clip`` and ``price_centre`` as in
    :func:`elasticity_log_rate`. ``family``: the count likelihood (default
    :class:`hbjax.Poisson`) and ``parameter`` its parameter (e.g. ``log phi``).
    """
    log_rate = elasticity_log_rate(
        unit_elasticity, unit_effect, cell_effect, unit_idx, cell_idx, log_price, clip, price_centre
    )
    family = Poisson() if family is None else family
    log_pmf = family.log_kernel(log_rate, counts, parameter) - gammaln(counts + 1.0)
    return jnp.sum(weight * log_pmf)


def panel_log_likelihood(
    unit_elasticity: UnitFloat,
    unit_effect: UnitFloat,
    cell_effect: CellFloat,
    panel: Panel,
    clip: tuple[float, float] | None = None,
    price_centre: UnitFloat | None = None,
    family: AbstractCountLikelihood | None = None,
    parameter: Array | None = None,
) -> Scalar:
    """Log-likelihood of every row of ``panel``, sharded when the panel is.

    An unsharded panel goes straight to :func:`elasticity_log_likelihood`. A panel placed
    by :func:`hbjax.sharding.shard_panel` goes to :func:`blocked_log_likelihood`, built here
    from the panel's static mesh and block count at trace time. ``family`` and
    ``parameter`` as in :func:`elasticity_log_likelihood`.
    """
    rows = (panel.unit_idx, panel.cell_idx, panel.log_price, panel.counts, panel.weight)
    if panel.mesh is None:
        return elasticity_log_likelihood(
            unit_elasticity, unit_effect, cell_effect, *rows, clip, price_centre, family, parameter
        )
    assert panel.n_blocks is not None
    if price_centre is None:
        price_centre = jnp.zeros_like(unit_elasticity)
    family = Poisson() if family is None else family
    parameter = jnp.zeros((), jnp.float32) if parameter is None else parameter
    return blocked_log_likelihood(
        panel.mesh,
        panel.n_blocks,
        clip,
        family,
        unit_elasticity,
        unit_effect,
        cell_effect,
        price_centre,
        parameter,
        *rows,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def blocked_log_likelihood(
    mesh: Mesh,
    n_blocks: int,
    clip: tuple[float, float] | None,
    family: AbstractCountLikelihood,
    unit_elasticity: UnitFloat,
    unit_effect: UnitFloat,
    cell_effect: CellFloat,
    price_centre: UnitFloat,
    parameter: Float[Array, ""],
    unit_idx: ObsInt,
    cell_idx: ObsInt,
    log_price: ObsFloat,
    counts: ObsFloat,
    weight: ObsFloat,
) -> Scalar:
    """The log-likelihood of rows laid out as ``n_blocks`` equal blocks on ``mesh``.

    The log-rate is ``beta[unit] * (log_price - price_centre[unit]) + delta[unit] +
    gamma[cell]`` (pass zeros for no centring); no gradient flows to ``price_centre``.
    ``family`` is the count likelihood and ``parameter`` its scalar parameter (any value
    for one without: the Poisson).

    Each device sums each of its blocks; the per-block sums are gathered and added in
    block order. The gradient is written out (a custom VJP, from ``d loglik / d log_rate``
    saved by the forward pass) so that it too is reduced per block and then in block order:
    per-unit gradients come from one block each (exact under ``psum``), per-cell gradients
    (and the likelihood parameter's) are summed over blocks in order. On CPU the value and
    the gradient are therefore bitwise the same on any device count >= 2
    that divides ``n_blocks`` (2 hosts x 1 device == 1 host x 2 devices). A single device
    is compiled (fused) differently by XLA and agrees to float rounding; so do GPUs, whose
    scatter-adds are unordered.
    """
    return _blocked_forward(
        mesh,
        n_blocks,
        clip,
        family,
        unit_elasticity,
        unit_effect,
        cell_effect,
        price_centre,
        parameter,
        unit_idx,
        cell_idx,
        log_price,
        counts,
        weight,
    )[0]


def _blocked_forward(mesh, n_blocks, clip, family, beta, delta, gamma, centre, parameter, *rows):  # noqa: ANN001, ANN202, E501  # fmt: skip
    """Value, ``d loglik / d log_rate`` of every row and ``d loglik / d parameter``."""
    per_block = n_blocks // mesh.devices.size
    has_parameter = family.latent_shape() is not None

    def per_device(beta, delta, gamma, centre, parameter, unit_idx, cell_idx, log_price, counts, weight):  # noqa: ANN001, ANN202, E501  # fmt: skip
        raw = elasticity_log_rate(
            beta, delta, gamma, unit_idx, cell_idx, log_price, price_centre=centre
        )
        log_rate = raw if clip is None else jnp.clip(raw, clip[0], clip[1])
        # per-row derivatives of the count term (elementwise: one pull-back gives them all).
        # The parameter is made per row (varying over devices) before the pull-back: pulled
        # back through a replicated value, its per-row cotangents would be psum-ed across
        # devices here and again in the per-block sum below.
        per_row = jnp.zeros_like(counts) + parameter
        kernel, pull_back = jax.vjp(
            lambda rate, theta: family.log_kernel(rate, counts, theta), log_rate, per_row
        )
        d_rate, d_parameter = pull_back(weight)
        log_pmf = kernel - gammaln(counts + 1.0)
        partials = jnp.sum((weight * log_pmf).reshape(per_block, -1), axis=1)
        if clip is not None:  # the clip passes no gradient outside its range
            d_rate = jnp.where((raw > clip[0]) & (raw < clip[1]), d_rate, 0.0)
        if has_parameter:
            d_parameter = _sum_over_blocks(jnp.sum(d_parameter.reshape(per_block, -1), axis=1))
        else:
            d_parameter = jnp.zeros((), log_rate.dtype)
        return _sum_over_blocks(partials), d_rate, d_parameter

    return jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(P(), P(), P(), P(), P()) + (P(DATA_AXIS),) * 5,
        out_specs=(P(), P(DATA_AXIS), P()),
    )(beta, delta, gamma, centre, parameter, *rows)


def _blocked_fwd(mesh, n_blocks, clip, family, beta, delta, gamma, centre, parameter, *rows):  # noqa: ANN001, ANN202, E501  # fmt: skip
    value, d_rate, d_parameter = _blocked_forward(
        mesh, n_blocks, clip, family, beta, delta, gamma, centre, parameter, *rows
    )
    unit_idx, cell_idx, log_price = rows[:3]
    residuals = (
        d_rate, d_parameter, centre, unit_idx, cell_idx, log_price, beta.shape[0], gamma.shape[0]
    )  # fmt: skip
    return value, residuals


def _blocked_bwd(mesh, n_blocks, clip, family, residuals, cotangent):  # noqa: ANN001, ANN202
    d_rate, d_parameter, centre, unit_idx, cell_idx, log_price, n_units, n_cells = residuals
    per_block = n_blocks // mesh.devices.size

    def per_device(cotangent, d_rate, centre, unit_idx, cell_idx, log_price):  # noqa: ANN001, ANN202
        d_rate = cotangent * d_rate
        centred = log_price - centre[unit_idx]
        # each unit's rows sit in one block on one device: psum adds exact zeros
        d_beta = jax.lax.psum(jax.ops.segment_sum(d_rate * centred, unit_idx, n_units), DATA_AXIS)
        d_delta = jax.lax.psum(jax.ops.segment_sum(d_rate, unit_idx, n_units), DATA_AXIS)
        d_gamma_blocks = per_block_segment_sum(d_rate, cell_idx, per_block, n_cells)
        return d_beta, d_delta, _sum_over_blocks(d_gamma_blocks)

    grads = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(P(), P(DATA_AXIS), P(), P(DATA_AXIS), P(DATA_AXIS), P(DATA_AXIS)),
        out_specs=(P(), P(), P()),
    )(cotangent, d_rate, centre, unit_idx, cell_idx, log_price)
    return (*grads, None, cotangent * d_parameter, None, None, None, None, None)


blocked_log_likelihood.defvjp(_blocked_fwd, _blocked_bwd)


def dense_log_likelihood(
    unit_elasticity: UnitFloat,
    unit_effect: UnitFloat,
    cell_effect: CellFloat,
    panel: DensePanel,
    clip: tuple[float, float] | None = None,
    price_centre: UnitFloat | None = None,
) -> Scalar:
    """The Poisson log-likelihood on the dense layout (the fast kernel).

    ``price_centre`` as in :func:`elasticity_log_rate`. The grid is stored centred at
    ``panel.grid_centre`` (the default model's centres), so the centred model costs
    nothing per cell and its gradient has no cancellation.

    ``sum_n [y_n log_rate_n - exp(log_rate_n) - log y_n!]``: the first term is linear in
    the parameters and comes from the panel's sufficient statistics; only
    :func:`dense_rate_sum` touches the [slot, period] grid. Equal to
    :func:`elasticity_log_likelihood` on the same rows (a test checks values and
    gradients).
    """
    if clip is not None:
        raise ValueError(
            "the clipped log-rate is not linear in the parameters, so the dense layout "
            "cannot take it; place the panel with shard_panel(..., layout='rows')."
        )
    # The grid holds x - c (c = panel.grid_centre); beta (x - m) + delta is
    # beta (x - c) + delta - beta (m - c), and m == c for the default centred model.
    shift = -jnp.asarray(panel.grid_centre)
    if price_centre is not None:
        shift = price_centre + shift
    # sum_t y (x - m) per unit: a constant of the data, the same on every device
    counts_log_price = panel.counts_log_price_by_unit - shift * panel.counts_by_unit
    linear = (
        jnp.dot(unit_elasticity, counts_log_price)
        + jnp.dot(unit_effect, panel.counts_by_unit)
        + jnp.dot(cell_effect, panel.counts_by_cell)
    )
    rates = dense_rate_sum(
        panel.mesh,
        panel.n_blocks,
        panel.cell_chunk,
        unit_elasticity,
        unit_effect - unit_elasticity * shift,
        cell_effect,
        panel.log_price,
        panel.observed,
        panel.slot_unit,
        panel.slot_group,
    )
    return linear - rates - panel.log_factorial


def _dense_partials(beta, delta, gamma, log_price, observed, slot_unit, slot_group, n_blocks, chunk):  # noqa: ANN001, ANN202, E501  # fmt: skip
    """One device's blocks: ``sum exp(log_rate)`` per block and its gradient pieces.

    One pass over the grid gives the value and the three reductions its gradient needs.
    The per-cell sums add each ``chunk`` of slots (one group's, by the layout) first and
    scatter ``chunk`` times fewer rows onto the few (block, cell) targets.
    """
    n_groups = gamma.shape[0] // log_price.shape[1]
    cell = gamma.reshape(n_groups, -1)
    log_rate = beta[slot_unit][:, None] * log_price + delta[slot_unit][:, None] + cell[slot_group]
    rate = jnp.where(observed, jnp.exp(log_rate), 0.0)
    by_slot = jnp.sum(rate, axis=1)
    by_slot_log_price = jnp.sum(rate * log_price, axis=1)
    per_block = jnp.sum(by_slot.reshape(n_blocks, -1), axis=1)
    chunk_rate, chunk_group = chunk_sums(rate, slot_group, chunk)
    by_block_cell = per_block_segment_sum(
        chunk_rate, chunk_group, n_blocks, n_groups, indices_are_sorted=True
    )
    return per_block, by_slot_log_price, by_slot, by_block_cell


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def dense_rate_sum(
    mesh: Mesh | None,
    n_blocks: int,
    cell_chunk: int,
    unit_elasticity: UnitFloat,
    unit_effect: UnitFloat,
    cell_effect: CellFloat,
    log_price: Float[Array, "slot period"],
    observed: Bool[Array, "slot period"],
    slot_unit: Int[Array, " slot"],
    slot_group: Int[Array, " slot"],
) -> Scalar:
    """``sum over observed cells of exp(log_rate)``, reduced per block then in block order.

    Its gradient is computed in the same pass as the value (a custom VJP whose residuals
    are per-unit and per-cell sums only). Per-unit sums come from one block each and are
    combined exactly (``psum`` of disjoint supports); per-block sums are gathered and added
    in block order, so on CPU every device count >= 2 dividing ``n_blocks`` gives bitwise
    the same value and gradient. ``cell_chunk``: the layout's slots per chunk
    (:func:`hbjax.parallel.blocks.slot_plan`).
    """
    return _dense_forward(
        mesh,
        n_blocks,
        cell_chunk,
        unit_elasticity,
        unit_effect,
        cell_effect,
        log_price,
        observed,
        slot_unit,
        slot_group,
    )[0]


def _dense_forward(mesh, n_blocks, chunk, beta, delta, gamma, *grid):  # noqa: ANN001, ANN202
    n_units = beta.shape[0]

    def per_device(beta, delta, gamma, log_price, observed, slot_unit, slot_group):  # noqa: ANN001, ANN202
        local_blocks = n_blocks if mesh is None else n_blocks // mesh.devices.size
        per_block, by_slot_lp, by_slot, by_block_cell = _dense_partials(
            beta, delta, gamma, log_price, observed, slot_unit, slot_group, local_blocks, chunk
        )
        d_beta = jax.ops.segment_sum(by_slot_lp, slot_unit, n_units)
        d_delta = jax.ops.segment_sum(by_slot, slot_unit, n_units)
        if mesh is None:
            return jnp.sum(per_block), d_beta, d_delta, jnp.sum(by_block_cell, axis=0)
        # each unit sits in one slot on one device: psum adds exact zeros
        d_beta, d_delta = jax.lax.psum((d_beta, d_delta), DATA_AXIS)
        return (
            _sum_over_blocks(per_block),
            d_beta,
            d_delta,
            _sum_over_blocks(by_block_cell),
        )

    args = (beta, delta, gamma, *grid)
    if mesh is None:
        return per_device(*args)
    return jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(P(), P(), P()) + (P(DATA_AXIS),) * 4,
        out_specs=(P(), P(), P(), P()),
    )(*args)


def _dense_fwd(mesh, n_blocks, chunk, *args):  # noqa: ANN001, ANN202
    value, d_beta, d_delta, d_gamma = _dense_forward(mesh, n_blocks, chunk, *args)
    return value, (d_beta, d_delta, d_gamma)


def _dense_bwd(mesh, n_blocks, chunk, residuals, cotangent):  # noqa: ANN001, ANN202
    d_beta, d_delta, d_gamma = residuals
    grads = (cotangent * d_beta, cotangent * d_delta, cotangent * d_gamma)
    return (*grads, None, None, None, None)


dense_rate_sum.defvjp(_dense_fwd, _dense_bwd)
