"""A vocabulary fit's posterior as an ``arviz.InferenceData``, on the original labels."""

from __future__ import annotations

import jax
import numpy as np
import pandas as pd

from .._types import PRNGKeyArray
from ..extras import optional_import
from .frame import CountData


def to_arviz(
    data: CountData,
    guide: object,
    *,
    num_samples: int = 1000,
    key: PRNGKeyArray | None = None,
) -> object:
    """Guide draws of every value of ``data.model`` as an ``arviz.InferenceData`` (one chain).

    One variable per :meth:`~hbjax.counts.CountData.summary` table, its name with ``/``
    and ``:`` written ``__`` and ``_x_`` (``log_price/category`` -> ``log_price__category``,
    ``effect/category:week`` -> ``effect__category_x_week``), on a dimension named after
    its labels (``category``, the unit column, ``category:week`` for an effect's cells,
    coordinates ``"a:b"``); global values are scalars. So ``az.summary(idata,
    var_names=["log_price__category"])`` works as usual. Memory: ``num_samples`` x
    (values of the model) floats.

    Needs ArviZ: ``pip install "hbjax[arviz]"``.
    """
    az = optional_import("arviz", purpose="to_arviz")
    key = jax.random.key(0) if key is None else key
    draws = data.natural_draws(guide, num_samples, key)
    posterior, coords, dims = {}, {}, {}
    for name, (values, labels) in data.labelled(draws).items():
        variable = name.replace("/", "__").replace(":", "_x_")
        values = np.asarray(values)
        if values.ndim == 1 or list(labels) == ["global"]:
            posterior[variable] = values.reshape(num_samples)[None]
            continue
        dim = _dimension(labels, name.split("/")[-1])
        coords[dim] = _coordinates(labels)
        dims[variable] = [dim]
        posterior[variable] = values[None]
    return az.from_dict(
        posterior=posterior,
        coords=coords,
        dims=dims,
        attrs={"inference_library": "hbjax", "guide": type(guide).__name__},
    )


def _dimension(labels: pd.Index, fallback: str) -> str:
    """A dimension name: the labels' column(s), ``a:b`` for pairs (else ``fallback``)."""
    names = [str(n) for n in labels.names if n is not None]
    return ":".join(names) if names else fallback


def _coordinates(labels: pd.Index) -> list:
    """Labels as coordinates; cells of several columns as ``"a:b"`` strings."""
    if isinstance(labels, pd.MultiIndex):
        return [":".join(map(str, cell)) for cell in labels]
    return list(labels)


__all__ = ["to_arviz"]
