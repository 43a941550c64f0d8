"""A fitted elasticity model on disk: what ``hbjax fit`` leaves for ``hbjax predict``.

``DIR/fit.json`` (how to rebuild the model and guide), ``DIR/fit.eqx`` (their arrays,
Equinox serialisation: no pickle) and ``DIR/encoding/`` (the labels).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import equinox as eqx
import jax.numpy as jnp

from . import __version__
from .data import DataValidationError, Encoding, load_encoding, save_encoding
from .fit import FitResult
from .guide import GUIDES, AbstractGuide, LowRankNormal, make_guide
from .model import ElasticityModel

FORMAT = "hbjax-fit-1"
#: the format of a vocabulary fit (:func:`hbjax.counts.save_fit`).
COUNTS_FORMAT = "hbjax-counts-fit-1"
_DAMAGED = "%r holds a damaged saved fit (%s); fit again."
T = TypeVar("T")
_KINDS = {cls: name for name, cls in GUIDES.items()}


@dataclasses.dataclass(frozen=True)
class SavedFit:
    """A fit read back by :func:`load_fit`: enough for :func:`hbjax.predict` and summaries.

    Attributes:
        model: the fitted model.
        guide: the fitted guide.
        encoding: the labels of the data it was fitted to.
        info: what ``fit.json`` records (guide, hierarchy, steps, versions).
    """

    model: ElasticityModel
    guide: AbstractGuide
    encoding: Encoding
    info: dict


def save_fit(result: FitResult, encoding: Encoding, directory: str | os.PathLike[str]) -> None:
    """Save an :class:`~hbjax.ElasticityModel` fit with one of hbjax's guides."""
    model, guide = result.model, result.guide
    if not isinstance(model, ElasticityModel):
        raise TypeError(
            f"save_fit saves ElasticityModel fits; got {type(model).__name__} (a vocabulary "
            "fit: hbjax.counts.save_fit; your own: equinox.tree_serialise_leaves)."
        )
    kinds = guide_info(guide)
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    info = {
        "format": FORMAT,
        **kinds,
        "hierarchy": model.hierarchy.name,
        "price_centring": model.price_centre is not None,
        "intercept_prior": "zero" if model.intercept_prior_price is None else "reference",
        "likelihood": model.likelihood.name,
        "clip_log_rate": model.clip_log_rate,
        "n_units": len(encoding.units),
        "n_groups": len(encoding.groups),
        "n_periods": len(encoding.periods),
        "steps": result.steps,
        "hbjax_version": __version__,
    }
    eqx.tree_serialise_leaves(folder / "fit.eqx", (model, guide))
    save_encoding(encoding, folder / "encoding")
    (folder / "fit.json").write_text(json.dumps(info, indent=2) + "\n")  # last: marks complete


def load_fit(directory: str | os.PathLike[str]) -> SavedFit:
    """Read a fit saved by :func:`save_fit` (or by ``hbjax fit`` in its ``--out`` folder).

    Raises:
        DataValidationError: the folder holds no complete saved fit.
    """
    folder = Path(directory)
    info = read_info(folder, FORMAT)
    return rebuilt(folder, info, _rebuild)


def saved_format(folder: Path) -> object:
    """The ``format`` a saved fit's ``fit.json`` names (``None`` if it names none).

    Raises:
        DataValidationError: no ``fit.json``, or one that cannot be read.
    """
    return _fit_json(folder).get("format")


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
            FORMAT: "load it with hbjax.load_fit",
            COUNTS_FORMAT: "a vocabulary fit: load it with hbjax.counts.load_fit",
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


def _rebuild(folder: Path, info: dict) -> SavedFit:
    """The model and guide of ``fit.json`` as templates, filled from ``fit.eqx``."""
    encoding = load_encoding(folder / "encoding")
    clip = info["clip_log_rate"]
    model = ElasticityModel(
        encoding.unit_group,
        info["n_groups"],
        info["n_periods"],
        clip_log_rate=None if clip is None else tuple(clip),
        price_centre=jnp.zeros(info["n_units"]) if info["price_centring"] else None,
        # fits saved before the option had the article's prior at log price 0
        intercept_prior_price=jnp.zeros(info["n_units"])
        if info.get("intercept_prior", "zero") == "reference"
        else None,
        hierarchy=info["hierarchy"],
        likelihood=info.get("likelihood", "poisson"),  # fits saved before it was recorded
    )
    guide = make_guide(info["guide"], model, rank=info["rank"] or 8)
    model, guide = eqx.tree_deserialise_leaves(folder / "fit.eqx", (model, guide))
    return SavedFit(model, guide, encoding, info)


def guide_info(guide: AbstractGuide) -> dict:
    """``{"guide": kind, "rank": rank or None}`` of one of hbjax's Gaussian guides.

    Raises:
        TypeError: another guide (save it with ``equinox.tree_serialise_leaves``).
    """
    kind = _KINDS.get(type(guide))
    if kind is None:
        raise TypeError(
            "saved fits hold MeanFieldNormal, UnitBlockNormal or LowRankNormal guides; got "
            f"{type(guide).__name__} (serialise your own with equinox.tree_serialise_leaves)."
        )
    rank = int(guide.factor.shape[1]) if isinstance(guide, LowRankNormal) else None
    return {"guide": kind, "rank": rank}


__all__ = ["SavedFit", "load_fit", "save_fit"]
