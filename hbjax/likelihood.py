"""The Poisson log-likelihood kernel of the elasticity model.

:func:`elasticity_log_likelihood` is a plain function of *one shard* of observation rows
and replicated parameters: sum it over shards and you get the full log-likelihood. Rows
with ``weight == 0`` (padding) contribute exactly nothing. It knows nothing of meshes.
:func:`panel_log_likelihood` runs it on a whole panel: directly, or, for a panel placed on
a mesh by :func:`hbjax.sharding.shard_panel`, under ``jax.shard_map`` over ``"data"`` with
the parameters replicated and the partial sums combined by ``psum``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import gammaln
from jax.sharding import PartitionSpec as P

from ._types import CellFloat, ObsFloat, ObsInt, Scalar, UnitFloat
from .data import Panel
from .sharding import DATA_AXIS


def poisson_log_likelihood(log_rate: ObsFloat, counts: ObsFloat, weight: ObsFloat) -> Scalar:
    """``sum_n weight_n * log Poisson(counts_n | exp(log_rate_n))``.

    Args:
        log_rate: log of the Poisson mean of each row.
        counts: observed counts.
        weight: 1 for observed rows, 0 for padding (any non-negative weight is allowed).
    """
    log_pmf = counts * log_rate - jnp.exp(log_rate) - gammaln(counts + 1.0)
    return jnp.sum(weight * log_pmf)


def elasticity_log_rate(
    unit_elasticity: UnitFloat,
    unit_effect: UnitFloat,
    cell_effect: CellFloat,
    unit_idx: ObsInt,
    cell_idx: ObsInt,
    log_price: ObsFloat,
    clip: tuple[float, float] | None = None,
) -> ObsFloat:
    """``elasticity[unit] * log_price + effect[unit] + cell_effect[cell]`` for each row.

    ``clip=(lo, hi)`` clips the log-rate as the article does (``(-4, 20)``); gradients are
    then zero outside the range.
    """
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
) -> Scalar:
    """Poisson log-likelihood of one shard of rows (the per-shard kernel).

    Parameters (first three) are natural-scale and replicated; the rest are the shard's
    rows. Returns the shard's partial sum.
    """
    log_rate = elasticity_log_rate(
        unit_elasticity, unit_effect, cell_effect, unit_idx, cell_idx, log_price, clip
    )
    return poisson_log_likelihood(log_rate, counts, weight)


def panel_log_likelihood(
    unit_elasticity: UnitFloat,
    unit_effect: UnitFloat,
    cell_effect: CellFloat,
    panel: Panel,
    clip: tuple[float, float] | None = None,
) -> Scalar:
    """Poisson log-likelihood of every row of ``panel``, sharded when the panel is.

    The ``shard_map`` wrapper is built here, from the panel's static mesh, at trace time.
    """
    rows = (panel.unit_idx, panel.cell_idx, panel.log_price, panel.counts, panel.weight)
    if panel.mesh is None:
        return elasticity_log_likelihood(unit_elasticity, unit_effect, cell_effect, *rows, clip)

    def per_shard(
        beta: UnitFloat,
        delta: UnitFloat,
        gamma: CellFloat,
        unit_idx: ObsInt,
        cell_idx: ObsInt,
        log_price: ObsFloat,
        counts: ObsFloat,
        weight: ObsFloat,
    ) -> Scalar:
        partial = elasticity_log_likelihood(
            beta, delta, gamma, unit_idx, cell_idx, log_price, counts, weight, clip
        )
        return jax.lax.psum(partial, DATA_AXIS)

    sharded = jax.shard_map(
        per_shard,
        mesh=panel.mesh,
        in_specs=(P(), P(), P()) + (P(DATA_AXIS),) * len(rows),
        out_specs=P(),
    )
    return sharded(unit_elasticity, unit_effect, cell_effect, *rows)
