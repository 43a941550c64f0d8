"""The count-regression application: a model vocabulary over hbjax's layers.

:class:`CountRegression` (any covariates with fixed or hierarchical slopes over any nesting
of the units' labels, additive effects over label cells, an offset, Poisson or negative
binomial counts, optionally zero-inflated) is an :class:`~hbjax.AbstractRowModel`: it is
sharded and minibatched like any row model; with one row per unit and period it also sits
on a dense grid (:mod:`hbjax.counts.grid`: the fast layout). :func:`from_frame` builds it
from a table.

Names are imported on first use: ``hbjax.counts.regression`` and ``hbjax.counts.slopes``
load JAX and Equinox only; :func:`from_frame` loads pandas.
"""

from __future__ import annotations

from .._lazy import lazy_module

_EXPORTS = {
    **dict.fromkeys(
        ["CountData", "Effect", "Slope", "elasticity_terms", "from_file", "from_frame"], "frame"
    ),
    "FitReport": "report",
    **dict.fromkeys(["elasticity_data", "prepare"], "article"),
    **dict.fromkeys(["CountLatents", "CountRegression", "UnitTable"], "regression"),
    **dict.fromkeys(["CountGrid", "GridError", "place_grid"], "grid"),
    **dict.fromkeys(["FitConfig", "fit_counts"], "fit"),
    **dict.fromkeys(["SavedCountFit", "load_fit", "save_fit"], "saved"),
    "predict": "whatif",
    "to_arviz": "export",
    "CountSpec": "frame",
    "predictive_check": "check",
    "HierarchicalSlope": "slopes",
}

__all__ = sorted(_EXPORTS)


#: Submodules reachable as attributes (``hbjax.counts.families``, ...).
_SUBMODULES = (
    "article", "check", "export", "families", "fit", "frame", "grid", "plots", "reader",
    "regression", "report", "saved", "simulate", "slopes", "stats", "whatif",
)  # fmt: skip

__getattr__, __dir__ = lazy_module(__name__, _EXPORTS, _SUBMODULES)
