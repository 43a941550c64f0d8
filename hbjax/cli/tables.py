"""``hbjax fit``'s and ``hbjax prepare``'s column flags, and the table as count data.

The model is :func:`hbjax.counts.elasticity_data`'s: the price slope by product and every
level of ``--group`` (one level: the article's model), each ``--covariates`` slope by the
coarsest group.
"""

from __future__ import annotations

import argparse

from ..counts import CountData, elasticity_data
from ..counts.families import ARTICLE_CLIP
from ..io.tables import DataValidationError


def _names(text: str, flag: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",")) if text else ()
    if any(not name for name in names):
        raise DataValidationError(
            f"{flag} {text!r} has an empty name; write names separated by commas."
        )
    return names


#: The column flags' defaults: the article's column names.
COLUMN_FLAGS = {
    "unit": "product",
    "group": "category",
    "period": "period",
    "price": "price",
    "units": "units_sold",
    "covariates": "",
}


def column_arguments(args: argparse.Namespace) -> dict[str, object]:
    """:func:`hbjax.counts.elasticity_data`'s column arguments from the column flags."""
    return {
        "unit": args.unit,
        "groups": _names(args.group, "--group"),
        "period": args.period,
        "price": args.price,
        "counts": args.units,
        "covariates": _names(args.covariates, "--covariates"),
    }


def count_data(args: argparse.Namespace) -> CountData:
    """The table of ``hbjax fit`` (its column flags and model options) as count data.

    A folder from ``hbjax prepare`` keeps the columns it was prepared with (a column flag
    naming another is refused).

    Raises:
        DataValidationError: anything :func:`hbjax.counts.elasticity_data` refuses (named,
            with the fix).
    """
    return elasticity_data(
        args.file,
        **column_arguments(args),
        likelihood=args.likelihood,
        hierarchy=args.hierarchy,
        intercept_prior=args.intercept_prior,
        centre=not args.no_centring,
        clip_log_rate=ARTICLE_CLIP if args.clip else None,
        learn_spreads=args.learn_spreads,
    )


__all__ = ["COLUMN_FLAGS", "column_arguments", "count_data"]
