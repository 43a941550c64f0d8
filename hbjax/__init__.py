"""hbjax: fast, pure-JAX variational inference for large hierarchical Bayesian models."""

from importlib.metadata import PackageNotFoundError, version

from . import convergence as convergence
from . import extras as extras
from . import families as families
from . import guide_check as guide_check
from . import layers as layers
from . import minibatch as minibatch
from . import sharding as sharding
from . import stream as stream
from .data import DataValidationError as DataValidationError
from .data import DataWarning as DataWarning
from .data import DensePanel as DensePanel
from .data import Encoding as Encoding
from .data import Panel as Panel
from .data import from_file as from_file
from .data import from_frame as from_frame
from .data import read_table as read_table
from .families import AbstractCountLikelihood as AbstractCountLikelihood
from .families import NegativeBinomial as NegativeBinomial
from .families import Poisson as Poisson
from .fit import ConvergenceWarning as ConvergenceWarning
from .fit import FitResult as FitResult
from .fit import NonFiniteLossError as NonFiniteLossError
from .fit import default_optimizer as default_optimizer
from .fit import fit as fit
from .guide import AbstractGuide as AbstractGuide
from .guide import GaussianGuide as GaussianGuide
from .guide import LowRankNormal as LowRankNormal
from .guide import MeanFieldNormal as MeanFieldNormal
from .guide import UnitBlockNormal as UnitBlockNormal
from .guide import make_guide as make_guide
from .likelihood import elasticity_log_likelihood as elasticity_log_likelihood
from .likelihood import poisson_log_likelihood as poisson_log_likelihood
from .minibatch import UnitBatch as UnitBatch
from .minibatch import UnitSampler as UnitSampler
from .minibatch import UnitStats as UnitStats
from .model import AbstractModel as AbstractModel
from .model import ElasticityLatents as ElasticityLatents
from .model import ElasticityModel as ElasticityModel
from .objectives import elbo as elbo
from .objectives import log_weights as log_weights
from .objectives import renyi_bound as renyi_bound
from .objectives import renyi_elbo as renyi_elbo
from .pipeline import FitConfig as FitConfig
from .pipeline import fit_elasticities as fit_elasticities
from .posterior import Summary as Summary
from .posterior import predict as predict
from .posterior import sample_posterior as sample_posterior
from .posterior import summarize as summarize
from .posterior import to_arviz as to_arviz
from .saved import SavedFit as SavedFit
from .saved import load_fit as load_fit
from .saved import save_fit as save_fit
from .sharding import make_mesh as make_mesh
from .sharding import shard_panel as shard_panel
from .simulate import SimulatedPanel as SimulatedPanel
from .simulate import SimulationConfig as SimulationConfig
from .simulate import simulate as simulate
from .step import SVI as SVI
from .step import SVIState as SVIState
from .step import lazy_units as lazy_units
from .stream import read_grid as read_grid
from .stream import write_grid as write_grid

try:
    __version__ = version("hbjax")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"
