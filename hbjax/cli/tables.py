"""``hbjax fit``'s table as count data, and ``predict``/``check`` of a saved fit.

The model is :func:`hbjax.counts.elasticity_data`'s: the price slope by product and every
level of ``--group`` (one level: the article's model), each ``--covariates`` slope by the
coarsest group.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import pandas as pd

from ..counts import CountData, elasticity_data, load_fit, predict
from ..counts.check import check_saved_fit
from ..counts.families import ARTICLE_CLIP
from ..counts.frame import price_slope
from ..io.outputs import write_file_atomically
from ..io.tables import DataValidationError
from ..vi.checks import NutsCheck, UnitImportance


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

    A folder from ``hbjax prepare`` keeps the columns it was prepared with.

    Raises:
        DataValidationError: anything :func:`hbjax.counts.elasticity_data` refuses (named,
            with the fix).
    """
    data = elasticity_data(
        args.file,
        **column_arguments(args),
        likelihood=args.likelihood,
        hierarchy=args.hierarchy,
        intercept_prior=args.intercept_prior,
        centre=not args.no_centring,
        clip_log_rate=ARTICLE_CLIP if args.clip else None,
    )
    if data.on_disk:  # a prepared folder: flags given must be the ones it was prepared with
        _check_prepared_columns(args, data)
    return data


def _check_prepared_columns(args: argparse.Namespace, data: CountData) -> None:
    """A column flag given (not its default) that names another column than the folder's."""
    spec, price = data.spec, price_slope(data)
    prepared = {
        "unit": spec.unit,
        "group": ",".join(spec.groups),
        "period": spec.period,
        "price": None if price is None else price.column,
        "units": spec.counts,
        "covariates": ",".join(s.column for s in spec.slopes if s is not price),
    }
    for flag, default in COLUMN_FLAGS.items():
        given = getattr(args, flag)
        if given != default and given != prepared[flag]:
            raise DataValidationError(
                f"--{flag} {given!r}: {args.file!r} was prepared with --{flag} "
                f"{prepared[flag]!r}; its columns are fixed when prepared (drop the flag, or "
                "prepare the table again with it)."
            )


def predict_saved_fit(args: argparse.Namespace, out: Path) -> str:
    """``hbjax predict``: expected counts for the scenarios' rows; returns the line to print."""
    saved = load_fit(args.fit_dir)
    predictions = predict(
        saved.data,
        saved.guide,
        saved.read_table(args.prices),
        num_samples=args.samples,
        key=jax.random.key(args.seed),
    )
    write_file_atomically(out, lambda path: predictions.to_csv(path, index=False))
    return (
        f"predicted expected {saved.data.spec.counts} for {len(predictions)} rows "
        f"({saved.info['guide']} guide, {args.samples} draws, 90% intervals); wrote {out}"
    )


def check_args(args: argparse.Namespace) -> tuple[pd.DataFrame, NutsCheck, UnitImportance]:
    """``hbjax check``: :func:`hbjax.counts.check.check_saved_fit` with the flags."""
    return check_saved_fit(
        load_fit(args.fit_dir),
        args.file,
        key=jax.random.key(args.seed),
        num_units=args.products,
        num_shared=args.chains,
        warmup=args.warmup,
        draws=args.draws,
    )


__all__ = ["COLUMN_FLAGS", "check_args", "column_arguments", "count_data", "predict_saved_fit"]
