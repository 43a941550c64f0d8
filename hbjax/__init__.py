"""hbjax: fast, pure-JAX variational inference for large hierarchical Bayesian models.

Every name below is imported on first use (PEP 562): ``from hbjax.vi import layers`` or
``from hbjax.counts.families import Poisson`` loads JAX and Equinox only, not pandas, optax
or the fitting machinery; ``hbjax.fit`` loads what a fit needs when it is first touched.

The package: :mod:`hbjax.vi` (the core a researcher extends), :mod:`hbjax.parallel`
(meshes, block plans, rows of whole units, many hosts), :mod:`hbjax.io` (tables in, files
out), :mod:`hbjax.counts` (the count application: the article's model and its vocabulary)
and :mod:`hbjax.cli`. Imports point one way: cli -> counts/io -> parallel -> vi.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from ._lazy import lazy_module

#: Subpackages reachable as attributes (``hbjax.vi``, ``hbjax.counts``, ...).
_SUBMODULES = frozenset({"cli", "counts", "extras", "io", "parallel", "vi"})

#: Public names and the module each comes from: the core a researcher extends (models,
#: guides, objectives, the step and ``fit``: :mod:`hbjax.vi`), the data any model is fitted
#: to (:mod:`hbjax.parallel`), count likelihoods and simulation. The count application is
#: :mod:`hbjax.counts`.
_EXPORTS = {
    **dict.fromkeys(["DataValidationError", "DataWarning"], "io.tables"),
    **dict.fromkeys(
        ["AbstractCountLikelihood", "NegativeBinomial", "Poisson"], "counts.families"),
    **dict.fromkeys(
        ["ConvergenceWarning", "FitResult", "NonFiniteLossError", "default_optimizer", "fit"],
        "vi.fit"),
    **dict.fromkeys(
        ["AbstractGuide", "AbstractMinibatchGuide", "GaussianGuide", "LowRankNormal",
         "MeanFieldNormal", "UnitBlockNormal", "make_guide"], "vi.guide"),
    **dict.fromkeys(["AbstractModel", "AbstractUnitBatch", "AbstractUnitModel"], "vi.model"),
    **dict.fromkeys(
        ["AbstractRowModel", "UnitRows", "shard_rows"], "parallel.rows"),
    "make_mesh": "parallel.blocks",
    **dict.fromkeys(
        ["AbstractObjective", "RenyiBound", "elbo", "log_weights"], "vi.objectives"),
    **dict.fromkeys(["SimulationConfig", "simulate"], "counts.simulate"),
    **dict.fromkeys(["SVI", "lazy_units"], "vi.step"),
    **dict.fromkeys(["FullBatch", "Minibatches"], "vi.host"),
    "Checkpoints": "vi.checkpoint",
}  # fmt: skip

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_module(__name__, _EXPORTS, _SUBMODULES)


try:
    __version__ = version("hbjax")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"
