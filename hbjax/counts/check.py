"""The posterior predictive check of a count regression's likelihood.

The same statistics as the elasticity model's check (:func:`hbjax.guide_check.
predictive_check`): the dispersion index ``sum (y - mu)^2 / sum mu`` and the share of zero
counts, observed against counts replicated from the fit, overall and per group.
"""

from __future__ import annotations

import jax
import numpy as np

from .._types import PRNGKeyArray
from ..guide import AbstractGuide
from ..guide_check import PredictiveCheck, predictive_table
from ..parallel.blocks import seed_from_key
from .frame import CountData


def predictive_check(
    data: CountData,
    guide: AbstractGuide,
    *,
    key: PRNGKeyArray,
    num_units: int = 500,
    num_draws: int = 30,
    level: str | None = None,
) -> PredictiveCheck:
    """Observed counts of a subsample of units against counts replicated from the fit.

    Each of ``num_draws`` draws of all latents from ``guide`` gives every row's expected
    count ``mu`` (with zero inflation, ``(1 - pi) x rate``) and a replicated count from
    the likelihood (its dispersion per row, its structural zeros). A statistic whose
    observed value is in the outer 1% of its replicas and far from them contradicts the
    likelihood (see :class:`~hbjax.guide_check.PredictiveCheck`).

    Args:
        data: the fitted table (:func:`hbjax.counts.from_frame`).
        guide: the fitted guide.
        key: PRNG key (the subsample, the draws, the replicas).
        num_units: units to check (all when there are fewer).
        num_draws: replicated data sets (at least 20).
        level: the group level of the per-group rows (default: the dispersion's level,
            else the coarsest); ``None`` without group levels: one group.
    """
    if isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < 20:
        raise ValueError(f"num_draws must be an int >= 20; got {num_draws!r}.")
    model, rows = data.model, data.rows
    levels = list(data.levels)
    level = level or model.dispersion_level or (levels[-1] if levels else None)
    if level is not None and level not in data.levels:
        raise ValueError(f"level {level!r} is not a group level ({levels}).")
    rng = np.random.default_rng(seed_from_key(key))
    units = rng.choice(model.n_units, min(num_units, model.n_units), replace=False)
    picked = np.isin(np.asarray(rows.unit), units)
    subset = jax.tree.map(lambda x: np.asarray(x)[picked], rows)
    draws = guide.sample(num_draws, key=jax.random.fold_in(key, 1))  # type: ignore[attr-defined]
    log_rate, parameter, inflation = jax.jit(jax.vmap(lambda z: _per_row(model, z, subset)))(draws)
    mu = np.exp(np.asarray(log_rate, np.float64))
    if inflation is not None:
        mu = mu * (1.0 - np.asarray(inflation, np.float64)[:, None])
    unit = np.asarray(subset.unit)
    group = np.zeros(len(unit), np.int64)
    if level is not None:
        group = np.asarray(model.table.levels[level])[unit]

    def replicate(draw: int, m: np.ndarray) -> np.ndarray:
        p = None if parameter is None else np.asarray(parameter[draw], np.float64)
        if inflation is None:
            return model.likelihood.sample(rng, m, p)
        pi = float(inflation[draw])
        counts = model.likelihood.sample(rng, m / (1.0 - pi), p)
        return np.where(rng.random(m.shape) < pi, 0, counts)

    table = predictive_table(
        mu,
        np.asarray(subset.columns["counts"], np.float64),
        np.ones(len(unit), bool),
        group,
        len(data.levels[level]) if level is not None else 1,
        replicate,
    )
    return PredictiveCheck(table, model.likelihood.name, len(units), num_draws)


def _per_row(model, z, rows):  # noqa: ANN001, ANN202
    """``[row]`` log rates, the likelihood's parameter per row (or ``None``), zero share."""
    log_rate = model.log_rate(z, rows)
    parameter = model.log_dispersion(z)
    if parameter is not None and model.dispersion_level is not None:
        parameter = parameter[model.table.levels[model.dispersion_level][rows.unit]]
    if model.zero_inflation is None:
        return log_rate, parameter, None
    return log_rate, parameter, jax.nn.sigmoid(model.zero_inflation(z.zero_inflation))


__all__ = ["predictive_check"]
