"""hbjax: fast, pure-JAX variational inference for large hierarchical Bayesian models.

Every name below is imported on first use (PEP 562): ``import hbjax.layers`` or
``from hbjax.families import Poisson`` loads JAX and Equinox only, not pandas, optax or the
fitting machinery; ``hbjax.fit`` loads what a fit needs when it is first touched.
"""

from __future__ import annotations

import sys
import types
from importlib.metadata import PackageNotFoundError, version

from ._lazy import lazy_module

#: Submodules reachable as attributes (``hbjax.counts``, ``hbjax.layers``, ...).
_SUBMODULES = frozenset(
    {
        "checkpoint", "cli", "convergence", "counts", "data", "diagnostics", "extras",
        "families", "guide", "guide_check", "layers", "loop", "objectives", "outputs",
        "parallel", "perf", "plots", "simulate", "step", "vi",
    }
)  # fmt: skip

#: Public names and the submodule each comes from: the core a researcher extends (models,
#: layers' families, guides, objectives, the step and ``fit``), the data any model is fitted
#: to, and simulation. The count application is :mod:`hbjax.counts`.
_EXPORTS = {
    **dict.fromkeys(["DataValidationError", "DataWarning"], "data"),
    **dict.fromkeys(["AbstractCountLikelihood", "NegativeBinomial", "Poisson"], "families"),
    **dict.fromkeys(
        ["ConvergenceWarning", "FitResult", "NonFiniteLossError", "default_optimizer", "fit"],
        "fit"),
    **dict.fromkeys(
        ["AbstractGuide", "AbstractMinibatchGuide", "GaussianGuide", "LowRankNormal",
         "MeanFieldNormal", "UnitBlockNormal", "make_guide"], "guide"),
    **dict.fromkeys(["AbstractModel", "AbstractUnitBatch", "AbstractUnitModel"], "vi.model"),
    **dict.fromkeys(
        ["AbstractRowModel", "RowBatch", "RowSampler", "UnitRows", "shard_rows"], "parallel.rows"),
    "make_mesh": "parallel.blocks",
    **dict.fromkeys(["RenyiBound", "elbo", "log_weights"], "objectives"),
    **dict.fromkeys(["SimulationConfig", "simulate"], "simulate"),
    **dict.fromkeys(["SVI", "SVIState", "lazy_units"], "step"),
}  # fmt: skip

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_module(__name__, _EXPORTS, _SUBMODULES)


class _Package(types.ModuleType):
    """``hbjax.fit`` and ``hbjax.simulate`` are the functions, never their modules.

    Importing the submodule ``hbjax.fit`` (as hbjax's own modules do) sets the package's
    attribute ``fit`` to the module; the function is returned instead.
    """

    def __getattribute__(self, name: str) -> object:
        value = super().__getattribute__(name)
        if name in ("fit", "simulate") and isinstance(value, types.ModuleType):
            value = getattr(value, name)
            super().__setattr__(name, value)
        return value


sys.modules[__name__].__class__ = _Package

try:
    __version__ = version("hbjax")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"
