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
from ..counts.families import ARTICLE_CLIP
from ..counts.frame import read_frame
from ..counts.report import price_slope
from ..io.outputs import write_file_atomically
from ..io.tables import DataValidationError
from ..vi.checkpoint import content_hash
from ..vi.checks import NutsCheck, UnitImportance, nuts_check, on_value_scale, unit_importance
from ..vi.layers import Centred


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


def _text_labels(data: CountData) -> list[str]:
    """The label columns a fit read as text (all, unless its labels were numbers)."""
    levels = {data.spec.unit: data.units, **data.levels}
    return [column for column, labels in levels.items() if labels.dtype == object]


def predict_saved_fit(args: argparse.Namespace, out: Path) -> str:
    """``hbjax predict``: expected counts for the scenarios' rows; returns the line to print.

    Label columns are read as the fit read them (text as written, unless the fit's labels
    were numbers); periods as in the fit.
    """
    saved = load_fit(args.fit_dir)
    data, spec = saved.data, saved.data.spec
    frame = read_frame(args.prices, labels=_text_labels(data), period=spec.period)
    predictions = predict(
        data, saved.guide, frame, num_samples=args.samples, key=jax.random.key(args.seed)
    )
    write_file_atomically(out, lambda path: predictions.to_csv(path, index=False))
    return (
        f"predicted expected {spec.counts} for {len(predictions)} rows ({saved.info['guide']} "
        f"guide, {args.samples} draws, 90% intervals); wrote {out}"
    )


def check_saved_fit(args: argparse.Namespace) -> tuple[pd.DataFrame, NutsCheck, UnitImportance]:
    """``hbjax check``: a saved fit's per-product slopes against NUTS, and k-hat.

    The table is read and encoded as the fit read it (the saved spec names the columns;
    the column flags are not needed) and must give the fit's labels. Returns the NUTS
    table of every per-product slope the verdict covers, price elasticities first
    (``leaf`` ``"elasticity"``, then the covariate's name; on the slope's scale with the
    centred hierarchy, else their latents), the NUTS check and the per-product k-hat.
    """
    saved = load_fit(args.fit_dir)
    spec, fitted = saved.data.spec, saved.data
    price = price_slope(fitted)
    if price is None:
        raise ValueError(
            f"{args.fit_dir!r} has no per-product log slope (a price) to check; hbjax check "
            "compares products' price elasticities with NUTS."
        )
    data = spec.data(read_frame(args.file, labels=_text_labels(fitted), period=spec.period))
    for name, here, there in (
        ("units", data.units, fitted.units),
        *((f"{level} labels", data.levels[level], fitted.levels[level]) for level in data.levels),
    ):
        if not here.equals(there):
            raise ValueError(
                f"{args.file!r} is not the table {args.fit_dir!r} was fitted to (its {name} "
                "differ); pass the same file as to `hbjax fit`."
            )
    fitted_rows = saved.info.get("rows_hash")
    if fitted_rows is not None and content_hash(data.rows) != fitted_rows:
        raise ValueError(
            f"{args.file!r} is not the table {args.fit_dir!r} was fitted to (its labels match "
            "but its rows differ); pass the same file as to `hbjax fit`."
        )
    key = jax.random.key(args.seed)
    model = fitted.model
    importance = unit_importance(model, saved.guide, data.rows, key=jax.random.fold_in(key, 0))
    nuts = nuts_check(
        model,
        saved.guide,
        data.rows,
        key=jax.random.fold_in(key, 1),
        num_units=args.products,
        num_shared=args.chains,
        warmup=args.warmup,
        draws=args.draws,
    )
    parts = []  # the price first, then every other per-product slope the verdict covers
    for slope in sorted(spec.slopes, key=lambda s: s is not price):
        part = nuts.table[nuts.table["leaf"] == f"slopes['{slope.name}']['unit']"].copy()
        if part.empty:
            continue
        part.insert(0, spec.unit, fitted.units[part.pop("unit").to_numpy()])
        layer = model.slopes[slope.name]
        name = "elasticity" if slope is price else slope.name
        if isinstance(layer.hierarchy, Centred):  # b_i = loc + scale v_i: the slope itself
            part = on_value_scale(part, float(layer.top.loc), float(layer.unit_scale), name)
        parts.append(part)
    return pd.concat(parts, ignore_index=True), nuts, importance


__all__ = ["check_saved_fit", "column_arguments", "count_data", "predict_saved_fit"]
