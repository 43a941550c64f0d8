"""Posterior draws and summaries on the original labels."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from statistics import NormalDist
from types import SimpleNamespace
from typing import TYPE_CHECKING

import equinox as eqx
import jax
import numpy as np
import pandas as pd
from jaxtyping import Float

from ._types import PRNGKeyArray, PyTree
from .data import DataValidationError, DataWarning, Encoding, _numeric, _period_values, _rows, _show
from .extras import optional_import
from .fit import FitResult

if TYPE_CHECKING:
    from .saved import SavedFit

#: Quantiles reported by :func:`summarize` (a 90% central interval and the median).
QUANTILES = {"q05": 0.05, "q50": 0.5, "q95": 0.95}


def sample_posterior(
    result: FitResult | SavedFit,
    num_samples: int = 1000,
    *,
    key: PRNGKeyArray,
    batch_size: int = 250,
) -> PyTree[np.ndarray]:
    """Draws from the fitted guide, on the model's natural scale, as host arrays.

    Args:
        result: a fit.
        num_samples: number of draws.
        key: PRNG key.
        batch_size: draws computed at once (bounds device memory).

    Returns:
        The model's latent pytree with a leading ``[num_samples]`` axis on every leaf.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1; got {num_samples}.")

    @eqx.filter_jit
    def draw(guide, model, n, key):  # noqa: ANN001, ANN202
        return jax.vmap(model.natural)(guide.sample(n, key=key))

    batches = []
    for i, start in enumerate(range(0, num_samples, batch_size)):
        n = min(batch_size, num_samples - start)
        batch = draw(result.guide, result.model, n, jax.random.fold_in(key, i))
        batches.append(jax.tree.map(np.asarray, batch))
    return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *batches)


def _labelled_draws(
    result: FitResult | SavedFit,
    encoding: Encoding,
    num_samples: int,
    key: PRNGKeyArray | None,
) -> PyTree[np.ndarray]:
    """Posterior draws (default key 0), refused if the encoding is of another panel."""
    key = jax.random.key(0) if key is None else key
    draws = sample_posterior(result, num_samples, key=key)
    n_units = len(encoding.units)
    if draws.unit_elasticity.shape[-1] != n_units:
        raise ValueError(
            f"the fit has {draws.unit_elasticity.shape[-1]} units but the encoding has "
            f"{n_units}; pass the encoding returned with this fit's panel."
        )
    return draws


def _describe(draws: np.ndarray) -> dict[str, np.ndarray]:
    """Mean, sd and quantiles over the leading (sample) axis."""
    draws = np.asarray(draws, dtype=np.float64)
    stats = {
        "mean": np.asarray(draws.mean(axis=0)),
        "sd": np.asarray(draws.std(axis=0, ddof=1 if len(draws) > 1 else 0)),
    }
    quantiles = np.quantile(draws, list(QUANTILES.values()), axis=0)
    stats.update({name: np.asarray(q) for name, q in zip(QUANTILES, quantiles, strict=True)})
    return stats


def _gaussian(mean: np.ndarray, sd: np.ndarray) -> dict[str, np.ndarray]:
    """Mean, sd and quantiles of normals (the exact summaries of a Gaussian marginal)."""
    mean, sd = np.asarray(mean, np.float64), np.asarray(sd, np.float64)
    stats = {"mean": mean, "sd": sd}
    stats.update({name: mean + NormalDist().inv_cdf(q) * sd for name, q in QUANTILES.items()})
    return stats


@dataclasses.dataclass(frozen=True)
class Summary:
    """Posterior summaries of the elasticities on the original labels.

    Each table has ``mean, sd, q05, q50, q95`` (a 90% interval and the median).

    Attributes:
        units: one row per unit: the unit and group columns named as in the input.
        groups: one row per group.
        overall: one row: the global elasticity.
        num_samples: draws the summaries are based on (0: exact, no draws).
        exact: whether the summaries are the guide's exact Gaussian marginals (the
            elasticities are linear in the latents) rather than Monte Carlo estimates.
    """

    units: pd.DataFrame
    groups: pd.DataFrame
    overall: pd.DataFrame
    num_samples: int
    exact: bool = False


#: Most unit draws (samples x units) :func:`summarize` holds at once: about 0.5 GiB.
MAX_UNIT_DRAWS = 2**26


def summarize(
    result: FitResult,
    encoding: Encoding,
    *,
    num_samples: int = 1000,
    key: PRNGKeyArray | None = None,
    max_unit_draws: int = MAX_UNIT_DRAWS,
) -> Summary:
    """Summaries of unit, group and global elasticities on the natural scale.

    Args:
        result: a fit of an :class:`hbjax.ElasticityModel`.
        encoding: the labels from :func:`hbjax.from_frame`.
        num_samples: posterior draws to summarise (Monte Carlo error of a quantile is
            about ``sd * 1.3 / sqrt(num_samples)`` at the 5%/95% tails).
        key: PRNG key for the draws (default ``jax.random.key(0)``).
        max_unit_draws: beyond ``num_samples x units`` of this, units are summarised in
            chunks of ``max_unit_draws / num_samples`` from the guide restricted to them
            (guides that factorise over units: mean-field, unit-block), so memory stays
            bounded for millions of units. Each unit's summary is the same in law.

    With a Gaussian guide (:class:`hbjax.GaussianGuide`: every guide hbjax ships) the
    elasticities, linear in the latents, have Gaussian marginals: their mean, sd and
    quantiles are computed exactly (:func:`hbjax.guide.linear_moments`) and ``num_samples``
    and ``key`` are not used. Other guides are summarised from draws.

    Returns:
        A :class:`Summary`; ``summary.units`` has columns
        ``[unit, group, mean, sd, q05, q50, q95]``.
    """
    n_units = len(encoding.units)
    exact = _exact_elasticities(result, n_units)
    if exact is not None:
        (mean_g, mean_c, mean_i), (sd_g, sd_c, sd_i) = exact
        unit_stats = _gaussian(mean_i, sd_i)
        group_stats, global_stats = _gaussian(mean_c, sd_c), _gaussian(mean_g, sd_g)
        return _summary(encoding, unit_stats, group_stats, global_stats, 0, exact=True)
    if num_samples * n_units > max_unit_draws and _summarise_in_chunks(result):
        unit_stats, draws = _unit_stats_in_chunks(
            result, encoding, num_samples, key, max(1, max_unit_draws // num_samples)
        )
    else:
        draws = _labelled_draws(result, encoding, num_samples, key)
        unit_stats = _describe(draws.unit_elasticity)
    group_stats = _describe(draws.group_elasticity)
    global_stats = _describe(draws.global_elasticity)
    return _summary(encoding, unit_stats, group_stats, global_stats, num_samples, exact=False)


def _summary(
    encoding: Encoding,
    unit_stats: dict[str, np.ndarray],
    group_stats: dict[str, np.ndarray],
    global_stats: dict[str, np.ndarray],
    num_samples: int,
    *,
    exact: bool,
) -> Summary:
    """The labelled tables."""
    units = pd.concat([encoding.unit_frame(), pd.DataFrame(unit_stats)], axis=1)
    groups = pd.concat(
        [pd.DataFrame({encoding.group_column: encoding.groups}), pd.DataFrame(group_stats)],
        axis=1,
    )
    overall = pd.DataFrame({k: [float(v)] for k, v in global_stats.items()})
    overall.insert(0, "parameter", ["global elasticity"])
    return Summary(units, groups, overall, num_samples=num_samples, exact=exact)


def _exact_elasticities(result: FitResult | SavedFit, n_units: int) -> tuple | None:
    """Exact means and sds of the global, group and unit elasticities, or ``None``."""
    from .guide import GaussianGuide, linear_moments
    from .model import ElasticityModel

    if not isinstance(result.guide, GaussianGuide) or not isinstance(result.model, ElasticityModel):
        return None
    if result.model.unit_effect.shape[0] != n_units:
        raise ValueError(
            f"the fit has {result.model.unit_effect.shape[0]} units but the encoding has "
            f"{n_units}; pass the encoding returned with this fit's panel."
        )
    moments = linear_moments(result.guide, result.model.elasticities)
    return None if moments is None else jax.tree.map(np.asarray, moments)


def summarize_dispersion(
    result: FitResult | SavedFit,
    *,
    num_samples: int = 1000,
    key: PRNGKeyArray | None = None,
) -> dict[str, float] | None:
    """Mean, sd, median and 90% interval of a negative-binomial fit's dispersion ``phi``.

    ``None`` for a likelihood without one (the Poisson). With a Gaussian guide ``log phi``
    is Gaussian (affine in the latents) and ``phi`` log-normal: exact, no draws; other
    guides are summarised from ``num_samples`` draws (``key``, default key 0).
    """
    from .families import NegativeBinomial
    from .guide import GaussianGuide, linear_moments

    model = result.model
    if not isinstance(getattr(model, "likelihood", None), NegativeBinomial):
        return None
    moments = None
    if isinstance(result.guide, GaussianGuide):
        moments = linear_moments(result.guide, lambda z: model.likelihood.parameter(z.dispersion))
    if moments is not None:
        m, s = (float(np.asarray(x)) for x in moments)
        stats = {"mean": math.exp(m + s * s / 2)}
        stats["sd"] = stats["mean"] * math.sqrt(math.expm1(s * s))
        stats.update({k: math.exp(m + NormalDist().inv_cdf(q) * s) for k, q in QUANTILES.items()})
        return stats
    key = jax.random.key(0) if key is None else key
    draws = sample_posterior(result, num_samples, key=key).dispersion
    return {k: float(v) for k, v in _describe(draws).items()}


def _summarise_in_chunks(result: FitResult | SavedFit) -> bool:
    """Whether the fit's guide draws a subset of units on its own (``restrict``)."""
    from .guide import AbstractMinibatchGuide
    from .model import ElasticityModel

    return isinstance(result.guide, AbstractMinibatchGuide) and isinstance(
        result.model, ElasticityModel
    )


def _unit_stats_in_chunks(
    result: FitResult | SavedFit,
    encoding: Encoding,
    num_samples: int,
    key: PRNGKeyArray | None,
    chunk: int,
    batch_size: int = 250,
) -> tuple[dict[str, np.ndarray], SimpleNamespace]:
    """Unit summaries chunk by chunk; group and global draws from the first chunk.

    Chunk ``c`` draws from ``guide.restrict(units of c)`` with key ``fold_in(key, c)``: the
    draws of different chunks are independent, each unit's and the shared latents'
    marginals are the guide's.
    """
    model, guide = result.model, result.guide
    key = jax.random.key(0) if key is None else key
    unit_leaves = model.unit_leaves()
    unit_group = np.asarray(encoding.unit_group)
    if model.unit_effect.shape[0] != len(unit_group):
        raise ValueError(
            f"the fit has {model.unit_effect.shape[0]} units but the encoding has "
            f"{len(unit_group)}; pass the encoding returned with this fit's panel."
        )

    @eqx.filter_jit
    def draw(guide, model, units, groups, n, key):  # noqa: ANN001, ANN202
        local = guide.restrict(units, unit_leaves).sample(n, key=key)
        return jax.vmap(lambda z: model.elasticities(z, groups))(local)

    stats: list[dict[str, np.ndarray]] = []
    shared = None
    for c, start in enumerate(range(0, len(unit_group), chunk)):
        units = np.arange(start, min(start + chunk, len(unit_group)), dtype=np.int32)
        parts = []
        for i, first in enumerate(range(0, num_samples, batch_size)):
            n = min(batch_size, num_samples - first)
            step_key = jax.random.fold_in(jax.random.fold_in(key, c), i)
            parts.append(draw(guide, model, units, unit_group[units], n, step_key))
        beta_g, beta_c, beta_i = (
            np.concatenate([np.asarray(p[j]) for p in parts]) for j in range(3)
        )
        stats.append(_describe(beta_i))
        if shared is None:
            shared = SimpleNamespace(global_elasticity=beta_g, group_elasticity=beta_c)
    merged = {name: np.concatenate([s[name] for s in stats]) for name in stats[0]}
    return merged, shared


def to_arviz(
    result: FitResult,
    encoding: Encoding,
    *,
    num_samples: int = 1000,
    key: PRNGKeyArray | None = None,
) -> object:
    """Posterior draws of an elasticity fit as an ``arviz.InferenceData`` (one chain).

    Variables (natural scale) and their dimensions, named after the input's columns:
    ``global_elasticity``; ``group_elasticity [group]``; ``unit_elasticity [unit]``;
    ``unit_effect [unit]``; ``group_period_effect [group, period]``; the coordinates are
    the original labels, so ``az.summary(idata, var_names=["group_elasticity"])`` and
    ``az.plot_forest(idata, var_names=["group_elasticity"])`` work as usual. Memory is
    ``num_samples x (2 units + groups x periods)`` floats.

    Needs ArviZ: ``pip install "hbjax[arviz]"``.

    Args:
        result: a fit of an :class:`hbjax.ElasticityModel`.
        encoding: the labels of its panel.
        num_samples: draws from the guide.
        key: PRNG key (default ``jax.random.key(0)``).
    """
    az = optional_import("arviz", purpose="to_arviz")
    draws = _labelled_draws(result, encoding, num_samples, key)
    unit, group = encoding.unit_column, encoding.group_column
    period = encoding.columns.get("period", "period")
    shape = (num_samples, len(encoding.groups), len(encoding.periods))
    posterior = {
        "global_elasticity": draws.global_elasticity,
        "group_elasticity": draws.group_elasticity,
        "unit_elasticity": draws.unit_elasticity,
        "unit_effect": draws.unit_effect,
        "group_period_effect": draws.group_period_effect.reshape(shape),
    }
    if getattr(draws, "dispersion", None) is not None:  # the negative binomial's phi
        posterior["dispersion"] = draws.dispersion
    return az.from_dict(
        posterior={name: np.asarray(value)[None] for name, value in posterior.items()},
        coords={
            unit: list(encoding.units),
            group: list(encoding.groups),
            period: list(encoding.periods),
        },
        dims={
            "group_elasticity": [group],
            "unit_elasticity": [unit],
            "unit_effect": [unit],
            "group_period_effect": [group, period],
        },
        attrs={
            "inference_library": "hbjax",
            "guide": type(result.guide).__name__,
            "steps": result.steps,
        },
    )


#: log(1e300): a larger log-rate overflows in float64.
_MAX_LOG_RATE = 690.0
#: predict warns for prices more than this factor above or below a unit's typical price.
FAR_PRICE_FACTOR = 3.0


def _warn_far_prices(
    model: object, units: np.ndarray, prices: np.ndarray, frame: pd.DataFrame, unit: str
) -> None:
    """Warn when prices lie far from each unit's typical (demand-weighted) price."""
    typical = getattr(model, "price_centre", None)
    if typical is None:
        typical = getattr(model, "intercept_prior_price", None)
    if typical is None:  # the article's uncentred model keeps no typical price
        return
    warn_far_from_typical(np.asarray(typical)[units], np.log(prices), frame, unit, "price")


def warn_far_from_typical(
    typical_log: Float[np.ndarray, " row"],
    values_log: Float[np.ndarray, " row"],
    frame: pd.DataFrame,
    unit: str,
    what: str,
) -> None:
    """Warn when values lie :data:`FAR_PRICE_FACTOR` times above or below their unit's typical.

    Both on the log scale, one per scenario row; one warning names the rows.
    """
    far = np.abs(np.asarray(values_log, np.float64) - typical_log) > np.log(FAR_PRICE_FACTOR)
    if far.any():
        first = int(np.flatnonzero(far)[0])
        warnings.warn(
            f"{what} more than {FAR_PRICE_FACTOR:g}x above or below the unit's typical {what} "
            f"in {_rows(frame, far)} (e.g. {np.exp(values_log[first]):.4g} for "
            f"{_show(frame[unit].iloc[first])}, typically {np.exp(typical_log[first]):.4g}): "
            "those predictions extrapolate the fitted demand curve far from the data.",
            DataWarning,
            stacklevel=4,
        )


def predict(
    fit: FitResult | SavedFit,
    encoding: Encoding,
    frame: pd.DataFrame,
    *,
    num_samples: int = 1000,
    key: PRNGKeyArray | None = None,
    interval: float = 0.9,
) -> pd.DataFrame:
    """Expected units sold at new prices for existing units: the pricing what-if.

    For each row, ``E[units] = exp(beta_i log(price) + gamma_{c(i),t} + delta_i)`` over
    posterior draws; the interval is for the expected value (the Poisson noise of a single
    week's count comes on top). Without a period column, ``gamma`` is the mean of the
    unit's group over the fitted periods (a typical period).

    Args:
        fit: a fit of an :class:`hbjax.ElasticityModel` (or :func:`hbjax.load_fit`'s).
        encoding: the labels of the fitted panel.
        frame: one row per scenario: the unit column, ``price``-column values (> 0) and
            optionally the period column (fitted periods only); other columns are kept.
        num_samples: posterior draws.
        key: PRNG key (default ``jax.random.key(0)``).
        interval: central interval probability.

    Returns:
        ``frame`` with ``expected_units`` (posterior mean), ``expected_units_lo`` and
        ``expected_units_hi`` (the interval) appended.

    Raises:
        DataValidationError: a missing column, an unknown unit or period, a bad price.
    """
    columns = encoding.columns
    unit, price, period = columns["unit"], columns.get("price", "price"), columns["period"]
    missing = [c for c in (unit, price) if c not in frame.columns]
    if missing:
        raise DataValidationError(
            f"the prices table needs columns {missing} (the unit and price columns of the fit;"
            f" it has {list(map(str, frame.columns))})."
        )
    if not 0 < interval < 1:
        raise ValueError(f"interval must be in (0, 1); got {interval}.")
    prices = _numeric(frame, price)
    bad = ~np.isfinite(prices) | ~(prices > 0)
    if bad.any():
        raise DataValidationError(
            f"column {price!r} must be finite and > 0; found {_show(prices[bad][0])} in "
            f"{_rows(frame, bad)}."
        )
    units = fitted_units(encoding.units, frame, unit)
    n_periods = len(encoding.periods)
    periods = None
    if period in frame.columns:
        periods = encoding.periods.get_indexer(_period_values(frame, period))
        if (periods < 0).any():
            raise DataValidationError(
                f"column {period!r} has periods the fit has not seen in "
                f"{_rows(frame, periods < 0)}; drop the column for a typical period."
            )
    model = fit.model
    _warn_far_prices(model, units, prices, frame, unit)
    draws = _labelled_draws(fit, encoding, num_samples, key)
    gamma = np.asarray(draws.group_period_effect).reshape(num_samples, -1, n_periods)
    group = np.asarray(encoding.unit_group)[units]
    cell = gamma[:, group, periods] if periods is not None else gamma.mean(axis=2)[:, group]
    log_rate = (
        np.asarray(draws.unit_elasticity)[:, units] * np.log(prices)
        + np.asarray(draws.unit_effect)[:, units]
        + cell
    )
    if model.clip_log_rate is not None:
        log_rate = np.clip(log_rate, *model.clip_log_rate)
    return with_expected_units(
        frame,
        log_rate,
        interval,
        lambda i: f"(e.g. {_show(prices[i])} for {_show(frame[unit].iloc[i])})",
    )


def fitted_units(units: pd.Index, frame: pd.DataFrame, column: str) -> np.ndarray:
    """``[row]`` each row's unit code among the fitted ``units``.

    Raises:
        DataValidationError: rows that name units the fit has not seen (the first named).
    """
    codes = units.get_indexer(frame[column])
    unknown = codes < 0
    if unknown.any():
        raise DataValidationError(
            f"{int(unknown.sum())} row(s) name units the fit has not seen (e.g. "
            f"{_show(frame[column][unknown].iloc[0])} in column {column!r}, "
            f"{_rows(frame, unknown)}); predict covers fitted units only."
        )
    return codes


def with_expected_units(
    frame: pd.DataFrame,
    log_rate: Float[np.ndarray, "draw row"],
    interval: float,
    example: Callable[[int], str],
) -> pd.DataFrame:
    """``frame`` with ``expected_units``, ``expected_units_lo`` and ``expected_units_hi``.

    The mean of ``exp(log_rate)`` over draws and its central ``interval``.

    Raises:
        DataValidationError: a row's expected units pass 1e300 (its values are far from the
            data); ``example(row)`` names what the row holds.
    """
    too_large = np.any(log_rate > _MAX_LOG_RATE, axis=0)
    if too_large.any():  # exp would overflow: inf units and NaN intervals, not an answer
        first = int(np.flatnonzero(too_large)[0])
        raise DataValidationError(
            f"the values in {_rows(frame, too_large)} {example(first)} give expected units "
            "beyond 1e300: they are far outside what the fit has seen; check their units "
            "(cents vs dollars?)."
        )
    rate = np.exp(np.asarray(log_rate, np.float64))
    tail = (1 - interval) / 2
    low, high = np.quantile(rate, [tail, 1 - tail], axis=0)
    return frame.assign(
        expected_units=rate.mean(axis=0), expected_units_lo=low, expected_units_hi=high
    )
