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

#: Submodules reachable as attributes (``hbjax.guide_check``, ...).
_SUBMODULES = frozenset(
    {
        "checkpoint", "cli", "convergence", "data", "diagnostics", "extras", "families",
        "guide", "guide_check", "layers", "likelihood", "loop", "minibatch", "model",
        "objectives", "outputs", "panel", "perf", "pipeline", "plots", "posterior", "saved",
        "counts", "parallel", "sharding", "step", "stream", "vi",
    }
)  # fmt: skip

#: Public names and the submodule each comes from.
_EXPORTS = {
    **dict.fromkeys(
        ["DataValidationError", "DataWarning", "Encoding", "from_file", "from_frame",
         "read_table"], "data"),
    **dict.fromkeys(["DensePanel", "Panel"], "panel"),
    **dict.fromkeys(["AbstractCountLikelihood", "NegativeBinomial", "Poisson"], "families"),
    **dict.fromkeys(
        ["ConvergenceWarning", "FitResult", "NonFiniteLossError", "default_optimizer", "fit"],
        "fit"),
    **dict.fromkeys(
        ["AbstractGuide", "AbstractMinibatchGuide", "GaussianGuide", "LowRankNormal",
         "MeanFieldNormal", "UnitBlockNormal", "make_guide"], "guide"),
    **dict.fromkeys(["elasticity_log_likelihood", "poisson_log_likelihood"], "likelihood"),
    **dict.fromkeys(["UnitBatch", "UnitSampler", "UnitStats"], "minibatch"),
    **dict.fromkeys(["ElasticityLatents", "ElasticityModel"], "model"),
    **dict.fromkeys(["AbstractModel", "AbstractUnitBatch", "AbstractUnitModel"], "vi.model"),
    **dict.fromkeys(
        ["AbstractRowModel", "RowBatch", "RowSampler", "UnitRows", "shard_rows"], "parallel.rows"),
    **dict.fromkeys(
        ["RenyiBound", "elbo", "log_weights", "renyi_bound", "renyi_elbo"], "objectives"),
    **dict.fromkeys(["FitConfig", "fit_elasticities"], "pipeline"),
    **dict.fromkeys(
        ["Summary", "predict", "sample_posterior", "summarize", "to_arviz"], "posterior"),
    **dict.fromkeys(["SavedFit", "load_fit", "save_fit"], "saved"),
    **dict.fromkeys(["make_mesh", "shard_panel"], "sharding"),
    **dict.fromkeys(["SimulatedPanel", "SimulationConfig", "simulate"], "simulate"),
    **dict.fromkeys(["SVI", "SVIState", "lazy_units"], "step"),
    **dict.fromkeys(["read_grid", "write_grid"], "stream"),
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
