"""``hbjax fit`` with ``--group a,b,...`` or ``--covariates``: the vocabulary's model.

``log E[units] = a_i + b_i (log price - c_i) + sum_k lift_k[top group] x_k
+ g[top group, period]``, the price slope by product and every group level
(:func:`hbjax.counts.from_frame`), each covariate's slope by the coarsest group. Writes
``estimates.csv`` (every value on its labels), ``losses.csv``, ``summary.json`` and the
fitted model (:func:`hbjax.counts.save_fit`: ``fit.json``, ``fit.eqx``, ``labels/``), which
``hbjax predict`` reads (:func:`predict_vocabulary`).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import numpy as np
import pandas as pd

from .. import __version__
from ..counts import (
    CountData,
    elasticity_terms,
    fit_counts,
    from_frame,
    load_fit,
    predict,
    predictive_check,
    save_fit,
)
from ..data import _period_values, duplicate_pair_error, read_table
from ..families import ARTICLE_CLIP
from ..fit import FitResult
from ..guide_check import (
    NutsCheck,
    PredictiveCheck,
    UnitImportance,
    nuts_check,
    on_value_scale,
    unit_importance,
)
from ..layers import Centred
from ..outputs import AtomicFolder, write_file_atomically
from ..pipeline import FitConfig
from ..posterior import Summary


def wants_vocabulary(args: argparse.Namespace) -> bool:
    """Several group levels or covariates: the vocabulary's model."""
    return "," in args.group or bool(args.covariates)


def _names(text: str, flag: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",")) if text else ()
    if any(not name for name in names):
        raise ValueError(f"{flag} {text!r} has an empty name; write names separated by commas.")
    return names


def fit_vocabulary(
    args: argparse.Namespace, config: FitConfig, folder: AtomicFolder | None, mesh: object
) -> tuple[dict, PredictiveCheck]:
    """Fit the table with the vocabulary's model and write its outputs into ``folder``.

    Returns the report (``summary.json``) and the posterior predictive check. Raises
    ``ValueError`` for bad flags and :class:`~hbjax.DataValidationError` for bad input.
    ``--no-centring`` takes the intercepts at covariates 0; ``--clip`` clips the log rate
    to the article's range (the fit then runs on rows, not the grid).
    """
    groups = _names(args.group, "--group")
    covariates = _names(args.covariates, "--covariates")
    start = time.perf_counter()
    frame = read_table(args.file)
    columns = [args.unit, *groups, args.period, args.price, args.units, *covariates]
    if len(set(columns)) != len(columns):
        raise ValueError(f"each column may have one role; got {columns}.")
    if args.period in frame.columns and args.unit in frame.columns:
        frame[args.period] = _period_values(frame, args.period)
        twice = frame.duplicated([args.unit, args.period], keep=False).to_numpy()
        if twice.any():
            first = frame[twice].iloc[0]
            roles = {"unit": args.unit, "period": args.period}
            where = f"{int(twice.sum())} rows are duplicates"
            raise duplicate_pair_error(roles, first[args.unit], first[args.period], where)
    slopes, effects = elasticity_terms(args.price, groups, args.period, covariates)
    data = from_frame(
        frame,
        unit=args.unit,
        counts=args.units,
        groups=groups,
        slopes=slopes,
        effects=effects,
        period=args.period,
        likelihood=args.likelihood,
        hierarchy=args.hierarchy,
        intercept_prior=args.intercept_prior,
        centre=not args.no_centring,
        clip_log_rate=ARTICLE_CLIP if args.clip else None,
    )
    result = fit_counts(data, config, mesh=mesh)
    tables = data.summary(result.guide, draws=args.samples, key=jax.random.key(args.seed))
    level = groups[-1]
    check = predictive_check(
        data, result.guide, key=jax.random.fold_in(jax.random.key(args.seed), 3), level=level
    )
    status = result.convergence
    report = {
        "input": str(args.file),
        "model": "vocabulary (hbjax.counts)",
        "n_obs": len(frame),
        "n_units": len(data.units),
        "groups": {g: len(data.levels[g]) for g in groups},
        "covariates": list(covariates),
        "likelihood": args.likelihood,
        "centring": not args.no_centring,
        "clip_log_rate": data.model.clip_log_rate,
        "steps": result.steps,
        "batch_size": result.batch_size,
        "converged": result.converged,
        "averaged_from_step": status.average_from,
        "averaged_to_step": status.average_to,
        "mcse_of_means_in_sd": status.mcse,
        "mcse_of_means_in_sd_max": status.mcse_max,
        "summaries": tables["intercept"].attrs["summary"],
        "price_elasticity": _rows(tables[f"log_{args.price}/global"]),
        "covariate_slopes": {c: _rows(tables[f"{c}/global"]) for c in covariates},
        "dispersion": _rows(tables["dispersion"]) if "dispersion" in tables else None,
        "predictive_check": {"level": level, **check.to_dict(data.levels[level])},
        "wall_seconds": time.perf_counter() - start,
        "devices": mesh.size,  # type: ignore[attr-defined]
        "processes": jax.process_count(),
        "hbjax_version": __version__,
        "jax_version": jax.__version__,
        "python_version": platform.python_version(),
    }
    if folder is not None:
        staging = Path(folder.staging)
        _long(tables).to_csv(staging / "estimates.csv", index=False)
        pd.DataFrame({"step": np.arange(len(result.losses)), "loss": result.losses}).to_csv(
            staging / "losses.csv", index=False
        )
        (staging / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
        save_fit(data, result, staging)
        if args.plots:
            _write_plots(args, result, data, tables, (check, level), staging / "plots")
        folder.commit()
    return report, check


def predict_vocabulary(args: argparse.Namespace, out: Path) -> str:
    """``hbjax predict`` of a vocabulary fit: expected counts for the scenarios' rows.

    Label columns are read as the fit read them (text as written, unless the fit's labels
    were numbers); periods as in the fit. Returns the line to print.
    """
    saved = load_fit(args.fit_dir)
    data, spec = saved.data, saved.data.spec
    levels = {spec.unit: data.units, **data.levels}
    text = [column for column, labels in levels.items() if labels.dtype == object]
    frame = _with_periods(read_table(args.prices, labels=text), spec.period)
    predictions = predict(
        data, saved.guide, frame, num_samples=args.samples, key=jax.random.key(args.seed)
    )
    write_file_atomically(out, lambda path: predictions.to_csv(path, index=False))
    return (
        f"predicted expected {spec.counts} for {len(predictions)} rows (vocabulary fit, "
        f"{saved.info['guide']} guide, {args.samples} draws, 90% intervals); wrote {out}"
    )


def check_vocabulary(
    args: argparse.Namespace,
) -> tuple[pd.DataFrame, NutsCheck, UnitImportance]:
    """``hbjax check`` of a vocabulary fit: its per-product slopes against NUTS, and k-hat.

    The table is read and encoded as the fit read it (the saved spec names the columns;
    the column flags are not needed) and must give the fit's labels. Returns the NUTS
    table of every per-product slope the verdict covers, price elasticities first
    (``leaf`` ``"elasticity"``, then the covariate's name; on the slope's scale with the
    centred hierarchy, else their latents), the NUTS check and the per-product k-hat.
    """
    saved = load_fit(args.fit_dir)
    spec, fitted = saved.data.spec, saved.data
    price = next((s for s in spec.slopes if s.log and "unit" in s.over), None)
    if price is None:
        raise ValueError(
            f"{args.fit_dir!r} has no per-product log slope (a price) to check; hbjax check "
            "compares products' price elasticities with NUTS."
        )
    data = spec.data(_with_periods(read_table(args.file), spec.period))
    for name, here, there in (
        ("units", data.units, fitted.units),
        *((f"{level} labels", data.levels[level], fitted.levels[level]) for level in data.levels),
    ):
        if not here.equals(there):
            raise ValueError(
                f"{args.file!r} is not the table {args.fit_dir!r} was fitted to (its {name} "
                "differ); pass the same file as to `hbjax fit`."
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


def _write_plots(
    args: argparse.Namespace,
    result: FitResult,
    data: CountData,
    tables: dict[str, pd.DataFrame],
    checked: tuple[PredictiveCheck, str],
    folder: Path,
) -> None:
    """``--plots``: the loss, elasticities by level, the predictive check.

    Each product's price elasticity around its finest group, a forest of every group
    level's elasticities, the predictive check per group of the level it was checked at.
    """
    from ..plots import write_hierarchy_plots

    slope = f"log_{args.price}"
    overall = tables[f"{slope}/global"]
    groups = list(data.levels)
    units = tables[f"{slope}/unit"].reset_index()
    finest = groups[0]
    codes = np.asarray(data.model.table.levels[finest])
    units.insert(1, finest, np.asarray(data.levels[finest])[codes])

    def level(name: str) -> Summary:
        return Summary(units, tables[f"{slope}/{name}"].reset_index(), overall, num_samples=0)

    check, check_level = checked
    write_hierarchy_plots(
        result,
        level(finest),
        [level(name) for name in groups],
        folder,
        predictive=check,
        predictive_groups=[str(label) for label in data.levels[check_level]],
    )


def _with_periods(frame: pd.DataFrame, period: str | None) -> pd.DataFrame:
    """``frame`` with its period column (if any) parsed as the fit parsed it."""
    if period is not None and period in frame.columns:
        frame[period] = _period_values(frame, period)
    return frame


def _rows(table: pd.DataFrame) -> dict[str, float]:
    """The one row of a table as ``{mean, sd, q05, q50, q95}``."""
    row = table.iloc[0]
    return {k: float(row[k]) for k in ("mean", "sd", "q05", "q50", "q95")}


def _long(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Every table in one: ``quantity, label, mean, sd, q05, q50, q95``."""
    parts = []
    for name, table in tables.items():
        labels = [":".join(map(str, x)) if isinstance(x, tuple) else str(x) for x in table.index]
        parts.append(table.reset_index(drop=True).assign(quantity=name, label=labels))
    long = pd.concat(parts, ignore_index=True)
    return long[["quantity", "label", "mean", "sd", "q05", "q50", "q95"]]


__all__ = ["check_vocabulary", "fit_vocabulary", "predict_vocabulary", "wants_vocabulary"]
