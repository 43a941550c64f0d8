"""The article's model as a preset of the vocabulary (and its extension to more levels).

``log E[units_it] = beta_i log(price_it) + gamma_{c(i),t} + delta_i``: the price slope by
unit and by every group level, each covariate's slope by the coarsest group, (coarsest
group x period) effects (:func:`~hbjax.counts.elasticity_terms`); one row per unit and
period. What ``hbjax fit`` and ``hbjax demo`` fit.

>>> data = hbjax.counts.elasticity_data("sales.csv")          # doctest: +SKIP
>>> result = hbjax.counts.fit_counts(data, hbjax.counts.FitConfig())  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence

import pandas as pd

from ..io.tables import DataValidationError
from .frame import CountData, CountSpec, elasticity_terms, from_file, from_frame, price_slope
from .reader import is_rows_folder, read_rows, write_rows


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
            (:func:`~hbjax.counts.from_file`); a folder written by :func:`prepare` is opened
            with its rows on disk (its columns are the ones it was prepared with).
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
    if not isinstance(table, pd.DataFrame) and is_rows_folder(table):
        data = read_rows(table, **options)
        given = {"unit": unit, "groups": tuple(groups), "period": period, "price": price}
        _check_prepared(data, table, given | {"counts": counts, "covariates": tuple(covariates)})
        return data
    arguments = _arguments(unit, groups, period, price, counts, covariates)
    if isinstance(table, pd.DataFrame):
        return from_frame(table, **arguments, one_row_per_period=True, **options)
    return from_file(table, **arguments, one_row_per_period=True, **options)


def prepare(
    path: str | os.PathLike[str],
    directory: str | os.PathLike[str],
    *,
    unit: str = "product",
    groups: Sequence[str] = ("category",),
    period: str = "period",
    price: str = "price",
    counts: str = "units_sold",
    covariates: Sequence[str] = (),
    chunk_rows: int = 1_000_000,
    progress: bool = True,
) -> CountData:
    """Stream a file too large for memory into a folder for :func:`elasticity_data`.

    ``hbjax prepare``: the file is read twice in chunks of ``chunk_rows`` rows, checked as
    :func:`elasticity_data` checks a table, and its rows written to memory-mapped files
    (:func:`hbjax.counts.reader.write_rows`). ``elasticity_data(directory, **options)``
    then opens it with any model options, its rows staying on disk (fit it with
    ``batch_size``). Arguments: as :func:`elasticity_data`'s.
    """
    arguments = _arguments(unit, groups, period, price, counts, covariates)
    spec = CountSpec(**arguments)
    return write_rows(
        path,
        directory,
        spec,
        one_row_per_period=True,
        chunk_rows=chunk_rows,
        progress=progress,
    )


def _check_prepared(data: CountData, folder: object, given: dict[str, object]) -> None:
    """No column argument given (not its default) that names another column than the folder's.

    The defaults are :func:`elasticity_data`'s own: a prepared folder's columns are taken
    where an argument is left at them.
    """
    defaults = inspect.signature(elasticity_data).parameters
    spec, price = data.spec, price_slope(data)
    prepared = {
        "unit": spec.unit,
        "groups": tuple(spec.groups),
        "period": spec.period,
        "price": None if price is None else price.column,
        "counts": spec.counts,
        "covariates": tuple(s.column for s in spec.slopes if s is not price),
    }
    for role, value in given.items():
        if value != defaults[role].default and value != prepared[role]:
            raise DataValidationError(
                f"{role} {value!r}: {str(folder)!r} was prepared with {role} "
                f"{prepared[role]!r}; its columns are fixed when prepared (leave {role} out, "
                "or prepare the table again with it)."
            )


def _arguments(
    unit: str,
    groups: Sequence[str],
    period: str,
    price: str,
    counts: str,
    covariates: Sequence[str],
) -> dict[str, object]:
    """The vocabulary's arguments of the article's model; every column in one role."""
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
    return {
        "unit": unit,
        "counts": counts,
        "groups": tuple(groups),
        "slopes": tuple(slopes),
        "effects": tuple(effects),
        "period": period,
    }


__all__ = ["elasticity_data", "prepare"]
