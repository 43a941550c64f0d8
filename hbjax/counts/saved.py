"""A vocabulary fit on disk: what ``hbjax fit --group a,b`` leaves for ``hbjax predict``.

``DIR/fit.json`` (the :class:`~hbjax.counts.CountSpec`, the guide, the sizes),
``DIR/fit.eqx`` (the model's and guide's arrays, Equinox serialisation: no pickle) and
``DIR/labels/`` (units, group levels, effect cells and periods, types kept).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import equinox as eqx
import jax.numpy as jnp
import pandas as pd

from .. import __version__
from .._types import float_dtype
from ..io.tables import DataValidationError, read_labels, write_labels
from ..vi.checkpoint import content_hash
from ..vi.fit import FitResult
from ..vi.guide import GUIDES, AbstractGuide, DependentNormal, LowRankNormal, make_guide
from .families import LIKELIHOODS
from .frame import CountData, CountSpec, build_model, read_frame
from .regression import UnitTable

#: The format of a saved fit (``fit.json``).
#: 2: effects' levels carried by the intercepts; 3: covariates standardised in the model.
COUNTS_FORMAT = "hbjax-counts-fit-3"
#: The format of the article's own stack's fits (before one path): refused, named.
OLD_FORMAT = "hbjax-fit-1"
_DAMAGED = "%r holds a damaged saved fit (%s); fit again."
T = TypeVar("T")
_KINDS = {cls: name for name, cls in GUIDES.items()}


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

    def read_table(self, path: str | os.PathLike[str]) -> pd.DataFrame:
        """A file read as the fit read its table (the scenarios of ``predict``, or it again).

        Label columns as text exactly as written (unless the fit's labels were numbers);
        periods as integers or dates.
        """
        data = self.data
        levels = {data.spec.unit: data.units, **data.levels}
        text = [column for column, labels in levels.items() if labels.dtype == object]
        return read_frame(path, labels=text, period=data.spec.period)

    def fitted_table(self, path: str | os.PathLike[str]) -> CountData:
        """The table the fit was fitted to, read again and checked to be it.

        Raises:
            ValueError: its labels or (when recorded) its rows differ from the fitted ones.
        """
        data, fitted = self.data.spec.data(self.read_table(path)), self.data
        levels = ((f"{g} labels", data.levels[g], fitted.levels[g]) for g in data.levels)
        for name, here, there in (("units", data.units, fitted.units), *levels):
            if not here.equals(there):
                raise ValueError(
                    f"{str(path)!r} is not the table the fit was fitted to (its {name} "
                    "differ); pass the same file as to `hbjax fit`."
                )
        rows_hash = self.info.get("rows_hash")
        if rows_hash is not None and content_hash(data.rows) != rows_hash:
            raise ValueError(
                f"{str(path)!r} is not the table the fit was fitted to (its labels match but "
                "its rows differ); pass the same file as to `hbjax fit`."
            )
        return data


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
        # the rows' hash: `hbjax check` refuses another table (not kept for rows on disk,
        # whose hash would read the whole folder)
        "rows_hash": None if data.rows is None or data.on_disk else content_hash(data.rows),
    }
    eqx.tree_serialise_leaves(folder / "fit.eqx", (result.model, result.guide))
    info["checksum"] = _checksum(folder, info)
    (folder / "fit.json").write_text(json.dumps(info, indent=2) + "\n")


def _checksum(folder: Path, info: dict) -> str:
    """A hash of ``fit.json``'s other entries and ``fit.eqx``: an edited fit is refused."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(
        json.dumps({k: v for k, v in info.items() if k != "checksum"}, sort_keys=True).encode()
    )
    digest.update((folder / "fit.eqx").read_bytes())
    return digest.hexdigest()


def load_fit(directory: str | os.PathLike[str]) -> SavedCountFit:
    """Read a fit written by :func:`save_fit` (or by ``hbjax fit --group a,b --out DIR``).

    Raises:
        DataValidationError: the folder holds no complete vocabulary fit (named).
    """
    folder = Path(directory)
    info = read_info(folder, COUNTS_FORMAT)
    if "checksum" in info and (folder / "fit.eqx").is_file():  # fits saved before it: no check
        if _checksum(folder, info) != info["checksum"]:
            raise DataValidationError(
                _DAMAGED % (str(folder), "fit.json or fit.eqx was edited after the fit")
            )
    return rebuilt(folder, info, _rebuild)


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
    zeros = jnp.zeros(n_units, float_dtype())
    table = UnitTable(
        levels={g: jnp.zeros(n_units, jnp.int32) for g in levels},
        centre=dict.fromkeys(names, zeros),
        reference=dict.fromkeys(names, zeros),
    )
    model = build_model(spec, table, levels, cells)
    dependent = bool(info.get("dependent", False))
    guide = make_guide(info["guide"], model, rank=info["rank"] or 8, dependent=dependent)
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


def _fit_json(folder: Path) -> dict:
    """``folder/fit.json``, read and parsed once; a missing or damaged one named."""
    if not (folder / "fit.json").is_file():
        raise DataValidationError(
            f"{str(folder)!r} holds no saved fit (fit.json); pass the --out folder of `hbjax fit`."
        )
    try:
        info = json.loads((folder / "fit.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataValidationError(
            _DAMAGED % (str(folder), f"fit.json: {type(exc).__name__}")
        ) from None
    if not isinstance(info, dict):
        raise DataValidationError(_DAMAGED % (str(folder), "fit.json is not an object"))
    return info


def read_info(folder: Path, expected: str) -> dict:
    """``fit.json`` of a saved fit of format ``expected``.

    Raises:
        DataValidationError: no or a damaged ``fit.json``, or another format (named).
    """
    info = _fit_json(folder)
    found = info.get("format")
    if found != expected:
        hint = {
            OLD_FORMAT: "a fit by the article's former own stack, which this version no "
            "longer reads: fit the table again",
        }.get(found, "fit again with this version")
        raise DataValidationError(
            f"{str(folder)!r} holds a fit of format {found!r}; this reads {expected!r} ({hint})."
        )
    return info


def rebuilt(folder: Path, info: dict, rebuild: Callable[[Path, dict], T]) -> T:
    """``rebuild(folder, info)``, any failure of a truncated or edited fit named in one line."""
    try:
        return rebuild(folder, info)
    except DataValidationError:
        raise
    except Exception as exc:  # noqa: BLE001 - a truncated or edited fit.eqx, a missing key
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise DataValidationError(_DAMAGED % (str(folder), reason)) from None


def guide_info(guide: AbstractGuide) -> dict:
    """``{"guide": kind, "rank": rank or None, "dependent": bool}`` of one of hbjax's guides.

    Raises:
        TypeError: another guide (save it with ``equinox.tree_serialise_leaves``).
    """
    dependent = isinstance(guide, DependentNormal)
    kind = _KINDS.get(type(guide.base if dependent else guide))
    if kind is None:
        raise TypeError(
            "saved fits hold MeanFieldNormal, UnitBlockNormal or LowRankNormal guides; got "
            f"{type(guide).__name__} (serialise your own with equinox.tree_serialise_leaves)."
        )
    rank = int(guide.factor.shape[1]) if isinstance(guide, LowRankNormal) else None
    return {"guide": kind, "rank": rank, "dependent": dependent}


__all__ = ["SavedCountFit", "load_fit", "save_fit"]
