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
    return elasticity_data(
        args.file,
        **column_arguments(args),
        likelihood=args.likelihood,
        hierarchy=args.hierarchy,
        intercept_prior=args.intercept_prior,
        centre=not args.no_centring,
        clip_log_rate=ARTICLE_CLIP if args.clip else None,
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


__all__ = ["check_args", "column_arguments", "count_data", "predict_saved_fit"]
