"""The article's model as a preset of the vocabulary (and its extension to more levels).

``log E[units_it] = beta_i log(price_it) + gamma_{c(i),t} + delta_i``: the price slope by
unit and by every group level, each covariate's slope by the coarsest group, (coarsest
group x period) effects (:func:`~hbjax.counts.elasticity_terms`); one row per unit and
period. What ``hbjax fit`` and ``hbjax demo`` fit.

>>> data = hbjax.counts.elasticity_data("sales.csv")          # doctest: +SKIP
>>> result = hbjax.counts.fit_counts(data, hbjax.FitConfig())  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import pandas as pd

from ..data import DataValidationError
from .frame import CountData, elasticity_terms, from_file, from_frame


def elasticity_data(
    table: pd.DataFrame | str | os.PathLike[str],
    *,
    unit: str = "product",
    groups: Sequence[str] = ("category",),
    period: str = "period",
    price: str = "price",
    counts: str = "units_sold",
    covariates: Sequence[str] = (),
    **options: object,
) -> CountData:
    """The article's model of a table (a DataFrame, or a CSV or Parquet file).

    Args:
        table: one row per unit and period; a file is read with its label columns as text
            exactly as written and its periods as integers or dates
            (:func:`~hbjax.counts.from_file`).
        unit: the unit (product) column.
        groups: the group columns, finest first (the article: one, ``"category"``).
        period: the period column.
        price: the price column (> 0; its log has the elasticity as slope).
        counts: the column of units sold.
        covariates: more columns, each with a slope by the coarsest group.
        **options: :func:`~hbjax.counts.from_frame`'s model options (``likelihood``,
            ``hierarchy``, ``intercept_prior``, ``centre``, ``clip_log_rate``, ...).

    Raises:
        DataValidationError: a column given two roles, a bad table (named, with the fix),
            a unit twice in a period.
    """
    roles = {"unit": [unit], "groups": list(groups), "period": [period], "price": [price]}
    roles |= {"counts": [counts], "covariates": list(covariates)}
    seen: dict[str, str] = {}
    for role, columns in roles.items():
        for column in columns:
            if column in seen:
                raise DataValidationError(
                    f"column {column!r} is given for both {seen[column]} and {role}; each "
                    "role needs its own column."
                )
            seen[column] = role
    slopes, effects = elasticity_terms(price, groups, period, covariates)
    arguments = {
        "unit": unit,
        "counts": counts,
        "groups": tuple(groups),
        "slopes": slopes,
        "effects": effects,
        "period": period,
        "one_row_per_period": True,
        **options,
    }
    if isinstance(table, pd.DataFrame):
        return from_frame(table, **arguments)
    return from_file(table, **arguments)


__all__ = ["elasticity_data"]
