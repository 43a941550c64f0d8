"""What-if predictions of a vocabulary fit: expected counts at new covariate values.

``predict(data, guide, scenarios)``: each scenario row names a fitted unit and the
covariates (price, promotion, ...) at any values; effects over labels the unit implies
(its groups) are read off the unit, others (e.g. the week) from the row, or averaged over
the fitted cells (a typical week) when the column is left out.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jaxtyping import Float, Int

from .._types import AnyArray, PRNGKeyArray, float_dtype
from ..io.tables import DataValidationError, DataWarning, shown, which_rows
from ..parallel.rows import UnitRows
from ..vi.guide import sample_once
from .frame import CountData, CountSpec, Effect, _covariate, _finite


def predict(
    data: CountData,
    guide: object,
    frame: pd.DataFrame,
    *,
    num_samples: int = 1000,
    key: PRNGKeyArray | None = None,
    interval: float = 0.9,
) -> pd.DataFrame:
    """Expected counts of existing units at the covariate values of ``frame``'s rows.

    For each row, ``E[y] = (1 - pi) exp(log rate)`` over ``num_samples`` guide draws
    (``pi``: the structural-zero share, 0 without zero inflation); the interval is for
    the expected value (the count's own noise comes on top).

    Args:
        data: the fitted model and labels (:func:`~hbjax.counts.from_frame`, or
            :func:`~hbjax.counts.load_fit`'s ``.data``).
        guide: the fitted guide.
        frame: one row per scenario: the unit column, every covariate column (values as in
            the fitted table: raw prices for a log slope), the offset column if the model
            has one, and optionally the effects' other label columns (e.g. the week;
            fitted cells only; left out: the mean over the fitted cells). Other columns
            are kept.
        num_samples: posterior draws.
        key: PRNG key (default ``jax.random.key(0)``).
        interval: central interval probability.

    Returns:
        ``frame`` with ``expected_units`` (posterior mean), ``expected_units_lo`` and
        ``expected_units_hi`` appended.

    Raises:
        DataValidationError: a missing column, an unknown unit or cell, a bad value (named).
    """
    spec = data.spec
    if spec is None:
        raise TypeError("predict needs data from hbjax.counts.from_frame (it names the columns).")
    if not isinstance(frame, pd.DataFrame) or len(frame) == 0:
        raise DataValidationError("the scenarios must be a non-empty pandas DataFrame.")
    if not 0 < interval < 1:
        raise ValueError(f"interval must be in (0, 1); got {interval}.")
    needed = [spec.unit, *(s.column for s in spec.slopes), *filter(None, [spec.offset])]
    missing = [c for c in dict.fromkeys(needed) if c not in frame.columns]
    if missing:
        raise DataValidationError(
            f"the scenarios need columns {missing} (the fit's unit, covariate and offset "
            f"columns; the table has {list(map(str, frame.columns))})."
        )
    units = fitted_units(data.units, frame, spec.unit)
    labels = _row_labels(data, spec, frame, units)
    floats = float_dtype()
    columns: dict = {"x": {s.name: _covariate(frame, s).astype(floats) for s in spec.slopes}}
    for slope in spec.slopes:  # log covariates (prices) far from each unit's typical value
        if slope.log:
            typical = np.asarray(data.model.table.centre[slope.name], np.float64)[units]
            warn_far_from_typical(typical, columns["x"][slope.name], frame, spec.unit, slope.column)
    if spec.offset is not None:
        columns["offset"] = _finite(frame, spec.offset).astype(floats)
    known, averaged = {}, {}
    for effect in spec.effects:
        present = [c for c in effect.labels if c in labels]
        if len(present) == len(effect.labels):
            known[effect.name] = _cell_codes(data.cells[effect.name], effect, labels, frame)
        else:
            averaged[effect.name] = _averaging(data.cells[effect.name], present, labels, frame)
    columns["cells"] = known
    model = data.model
    rows = UnitRows(
        jnp.asarray(units, jnp.int32), jnp.ones(len(units), floats), columns, model.n_units
    )
    key = jax.random.key(0) if key is None else key
    draws = sample_once(guide, num_samples, key)
    log_rate = np.asarray(_log_rates(model, draws, rows, averaged), np.float64)
    return with_expected_units(
        frame, log_rate, interval, lambda i: f"(e.g. unit {shown(frame[spec.unit].iloc[i])})"
    )


@eqx.filter_jit
def _log_rates(
    model: object,
    draws: object,
    rows: UnitRows,
    averaged: dict[str, tuple[Int[AnyArray, " cell"], Int[AnyArray, " row"], int]],
) -> Float[jax.Array, "draw row"]:
    """``[draw, row]`` log expected counts: known cells by the model, the rest averaged."""

    def one(z: object) -> jax.Array:
        rate = model.linear_log_rate(z, rows)  # type: ignore[attr-defined]
        effects = model.effect_values(z) if averaged else {}  # type: ignore[attr-defined]
        for name, (group, row_group, n_groups) in averaged.items():
            values = effects[name]
            total = jax.ops.segment_sum(values, group, n_groups)
            count = jax.ops.segment_sum(jnp.ones_like(values), group, n_groups)
            rate = rate + jnp.take(total / count, row_group)
        rate = model.clipped(rate)  # type: ignore[attr-defined]
        if model.zero_inflation is not None:  # type: ignore[attr-defined]
            w = model.zero_inflation(z.zero_inflation)  # type: ignore[attr-defined]
            rate = rate + jax.nn.log_sigmoid(-w)
        return rate

    return jax.vmap(one)(draws)


def _row_labels(
    data: CountData, spec: CountSpec, frame: pd.DataFrame, units: np.ndarray
) -> dict[str, np.ndarray]:
    """Each row's label in every column an effect may need.

    The unit, its groups (implied by the unit; a given column must agree), and the other
    columns the frame has.
    """
    table = data.model.table.levels
    labels = {spec.unit: np.asarray(data.units[units], dtype=object)}
    for group in spec.groups:
        implied = np.asarray(data.levels[group][np.asarray(table[group])[units]], dtype=object)
        if group in frame.columns:
            given = frame[group].to_numpy(dtype=object)
            wrong = given != implied
            if wrong.any():
                first = int(np.flatnonzero(wrong)[0])
                raise DataValidationError(
                    f"column {group!r} says {shown(given[first])} for unit "
                    f"{shown(frame[spec.unit].iloc[first])}, which the fit has in "
                    f"{shown(implied[first])} ({which_rows(frame, wrong)}); drop the column or "
                    "fix it."
                )
        labels[group] = implied
    for effect in spec.effects:
        for column in effect.labels:
            if column not in labels and column in frame.columns:
                labels[column] = frame[column].to_numpy(dtype=object)
    return labels


def _cell_codes(
    cells: pd.Index, effect: Effect, labels: dict[str, np.ndarray], frame: pd.DataFrame
) -> jnp.ndarray:
    """Each row's cell of ``effect``; rows in cells the fit has not seen are named."""
    if isinstance(cells, pd.MultiIndex):
        keys = pd.MultiIndex.from_arrays([labels[c] for c in effect.labels])
    else:
        keys = pd.Index(labels[effect.labels[0]])
    codes = cells.get_indexer(keys)
    if (codes < 0).any():
        first = int(np.flatnonzero(codes < 0)[0])
        raise DataValidationError(
            f"effect {effect.name!r}: {which_rows(frame, codes < 0)} lie in cells the fit has not "
            f"seen (e.g. {shown(keys[first])}); leave out its column "
            f"{[c for c in effect.labels if c in frame.columns]} for the mean over fitted cells."
        )
    return jnp.asarray(codes, jnp.int32)


def _averaging(
    cells: pd.Index, present: list[str], labels: dict[str, np.ndarray], frame: pd.DataFrame
) -> tuple[np.ndarray, np.ndarray, int]:
    """How to average an effect over the cells that match each row's ``present`` labels.

    Returns each cell's group, each row's group and the number of groups.
    """
    if not present:
        return np.zeros(len(cells), np.int32), np.zeros(len(frame), np.int32), 1
    keys = pd.MultiIndex.from_frame(cells.to_frame(index=False)[present])
    group, uniques = pd.factorize(keys)
    row_group = uniques.get_indexer(pd.MultiIndex.from_arrays([labels[c] for c in present]))
    if (row_group < 0).any():
        raise DataValidationError(
            f"{which_rows(frame, row_group < 0)} name {present} the fit's effect cells never have."
        )
    return group.astype(np.int32), row_group.astype(np.int32), len(uniques)


#: log(1e300): a larger log-rate overflows in float64.
_MAX_LOG_RATE = 690.0
#: predict warns for prices more than this factor above or below a unit's typical price.
FAR_PRICE_FACTOR = 3.0


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
            f"in {which_rows(frame, far)} (e.g. {np.exp(values_log[first]):.4g} for "
            f"{shown(frame[unit].iloc[first])}, typically {np.exp(typical_log[first]):.4g}): "
            "those predictions extrapolate the fitted demand curve far from the data.",
            DataWarning,
            stacklevel=4,
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
            f"{shown(frame[column][unknown].iloc[0])} in column {column!r}, "
            f"{which_rows(frame, unknown)}); predict covers fitted units only."
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
            f"the values in {which_rows(frame, too_large)} {example(first)} give expected units "
            "beyond 1e300: they are far outside what the fit has seen; check their units "
            "(cents vs dollars?)."
        )
    rate = np.exp(np.asarray(log_rate, np.float64))
    tail = (1 - interval) / 2
    low, high = np.quantile(rate, [tail, 1 - tail], axis=0)
    return frame.assign(
        expected_units=rate.mean(axis=0), expected_units_lo=low, expected_units_hi=high
    )


__all__ = ["predict"]
