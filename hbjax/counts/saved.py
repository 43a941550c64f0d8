"""A vocabulary fit on disk: what ``hbjax fit --group a,b`` leaves for ``hbjax predict``.

``DIR/fit.json`` (the :class:`~hbjax.counts.CountSpec`, the guide, the sizes),
``DIR/fit.eqx`` (the model's and guide's arrays, Equinox serialisation: no pickle) and
``DIR/labels/`` (units, group levels, effect cells and periods, types kept).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import equinox as eqx
import jax.numpy as jnp
import pandas as pd

from .. import __version__
from ..data import read_labels, write_labels
from ..families import LIKELIHOODS
from ..fit import FitResult
from ..guide import AbstractGuide, make_guide
from ..saved import COUNTS_FORMAT, guide_info, read_info, rebuilt
from .frame import CountData, CountSpec, build_model
from .regression import UnitTable


@dataclasses.dataclass(frozen=True)
class SavedCountFit:
    """A vocabulary fit read back by :func:`load_fit`.

    Attributes:
        data: the model and labels (``rows=None``: the table is not kept); its
            :meth:`~hbjax.counts.CountData.summary` and :func:`hbjax.counts.predict` work.
        guide: the fitted guide.
        info: what ``fit.json`` records (spec, guide, sizes, steps, versions).
    """

    data: CountData
    guide: AbstractGuide
    info: dict


def save_fit(data: CountData, result: FitResult, directory: str | os.PathLike[str]) -> None:
    """Save a fit of ``data.model`` (by :func:`hbjax.counts.fit_counts` or :func:`hbjax.fit`).

    ``fit.json`` is written last: a folder without it holds no complete fit.

    Raises:
        TypeError: ``data`` has no spec (built by hand, not by ``from_frame``), a likelihood
            of your own, or a guide that is not one of hbjax's Gaussian guides.
    """
    if data.spec is None:
        raise TypeError(
            "save_fit needs data from hbjax.counts.from_frame (it records how to rebuild the "
            "model); save a hand-built model with equinox.tree_serialise_leaves."
        )
    named = LIKELIHOODS.get(data.spec.likelihood)
    if named is None or type(data.model.likelihood) is not named:
        raise TypeError(
            f"save_fit saves the likelihoods {', '.join(LIKELIHOODS)}; got "
            f"{type(data.model.likelihood).__name__} (save it with "
            "equinox.tree_serialise_leaves)."
        )
    folder = Path(directory)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    labels = named_labels(data)
    kinds = {name: write_labels(index, folder / "labels", name) for name, index in labels.items()}
    info = {
        "format": COUNTS_FORMAT,
        "spec": data.spec.to_json(),
        **guide_info(result.guide),
        "n_units": len(data.units),
        "level_sizes": {g: len(v) for g, v in data.levels.items()},
        "cell_sizes": {e: len(v) for e, v in data.cells.items()},
        "labels": kinds,
        "steps": result.steps,
        "converged": result.converged,
        "hbjax_version": __version__,
    }
    eqx.tree_serialise_leaves(folder / "fit.eqx", (result.model, result.guide))
    (folder / "fit.json").write_text(json.dumps(info, indent=2) + "\n")


def load_fit(directory: str | os.PathLike[str]) -> SavedCountFit:
    """Read a fit written by :func:`save_fit` (or by ``hbjax fit --group a,b --out DIR``).

    Raises:
        DataValidationError: the folder holds no complete vocabulary fit (named).
    """
    folder = Path(directory)
    return rebuilt(folder, read_info(folder, COUNTS_FORMAT), _rebuild)


def named_labels(data: CountData) -> dict:
    """Every label index under a file-safe name (levels and effects by position)."""
    labels = {"units": data.units}
    labels.update({f"level_{i}": data.levels[g] for i, g in enumerate(data.levels)})
    labels.update({f"effect_{i}": data.cells[e] for i, e in enumerate(data.cells)})
    if data.periods is not None:
        labels["periods"] = data.periods
    return labels


def read_named_labels(folder: Path, spec: CountSpec, kinds: dict) -> dict:
    """The labels :func:`named_labels` named, read back: units, levels, cells, periods."""

    def read(name: str, column: str | None = None) -> pd.Index:
        return read_labels(folder, name, kinds[name], column)

    return {
        "units": read("units", spec.unit),
        "levels": {g: read(f"level_{i}", g) for i, g in enumerate(spec.groups)},
        "cells": {e.name: read(f"effect_{i}", e.name) for i, e in enumerate(spec.effects)},
        "periods": read("periods", spec.period) if "periods" in kinds else None,
    }


def _rebuild(folder: Path, info: dict) -> SavedCountFit:
    """The model of ``info["spec"]`` as a zero template, filled from ``fit.eqx``."""
    spec = CountSpec.from_json(info["spec"])
    n_units = int(info["n_units"])
    levels = {g: int(n) for g, n in info["level_sizes"].items()}
    cells = {e: int(n) for e, n in info["cell_sizes"].items()}
    names = {s.name for s in spec.slopes}
    zeros = jnp.zeros(n_units, jnp.float32)
    table = UnitTable(
        levels={g: jnp.zeros(n_units, jnp.int32) for g in levels},
        centre=dict.fromkeys(names, zeros),
        reference=dict.fromkeys(names, zeros),
    )
    model = build_model(spec, table, levels, cells)
    guide = make_guide(info["guide"], model, rank=info["rank"] or 8)
    model, guide = eqx.tree_deserialise_leaves(folder / "fit.eqx", (model, guide))
    named = read_named_labels(folder / "labels", spec, info["labels"])
    data = CountData(
        model,
        None,
        named["units"],
        named["levels"],
        named["cells"],
        None,
        named["periods"],
        spec,
    )
    bad = [g for g, n in levels.items() if len(data.levels[g]) != n]
    if len(data.units) != n_units or bad:
        raise ValueError(f"the labels do not match fit.json's sizes ({bad or 'units'})")
    return SavedCountFit(data, guide, info)


__all__ = ["SavedCountFit", "load_fit", "save_fit"]
