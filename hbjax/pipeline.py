"""The standard elasticity fit as one configuration: what ``hbjax fit`` and ``demo`` run.

:class:`FitConfig` holds every choice (guide, estimator, parameterisation, steps, batch
size, checkpoints); :func:`fit_elasticities` builds the model and its data-informed start,
places the data (one device, many, many hosts; full batch or minibatch) and calls
:func:`hbjax.fit`. Anything beyond this pipeline is a few lines of :func:`hbjax.fit`
with your own model, guide or objective.
"""

from __future__ import annotations

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from . import checkpoint
from ._types import PyTree
from .convergence import Convergence
from .data import Panel
from .families import ARTICLE_CLIP, LIKELIHOODS, AbstractCountLikelihood
from .fit import FitResult, default_optimizer, fit
from .guide import GUIDES, AbstractGuide, inverse_softplus, make_guide
from .layers import HIERARCHIES
from .minibatch import UnitStats, seed_from_key
from .model import INTERCEPT_PRIORS, ElasticityModel
from .objectives import RenyiBound
from .sharding import shard_panel
from .stream import GridStore
from .vi.model import AbstractModel

#: The most steps of a full-batch fit, and the most epochs of a minibatch fit (minibatch
#: fits converged in 40-80 epochs in our tests).
DEFAULT_STEPS, DEFAULT_EPOCHS = 20_000, 250
#: The default guide (benchmarks/README.md, "Intervals against NUTS").
DEFAULT_GUIDE = "unitblock"


#: Seeds are whole numbers below this (what every command and ``FitConfig`` accept).
SEEDS = 2**32


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """Every choice of the standard elasticity fit (the ``hbjax fit`` flags).

    Attributes:
        steps: the most steps (the fit stops once converged); ``None``: 20,000, or 250
            epochs with ``batch_size``.
        batch_size: products per step (minibatch SVI); ``None``: full batch.
        guide: ``"meanfield"``, ``"unitblock"`` or ``"lowrank"`` (:data:`hbjax.GUIDES`).
        rank: the low-rank guide's rank.
        gradient: ``"total"``, ``"dreg"`` or ``"stl"`` (:func:`hbjax.renyi_elbo`);
            ``None``: ``"dreg"`` for ``alpha = 0`` (fewer steps to converge), else
            ``"total"``.
        particles: importance particles ``K``.
        alpha: Rényi alpha (0: importance-weighted bound).
        learning_rate: Adam's initial rate (decayed per 1,000 steps, or per 1,000 epochs).
        centre_prices: take each product's intercept at its mean log price.
        hierarchy: ``"centred"`` or ``"noncentred"`` elasticity latents.
        intercept_prior: ``"reference"`` (each intercept's prior at the product's mean
            price: free of the currency unit) or ``"zero"`` (at log price 0, the article's).
        clip: clip the log-rate to ``[-4, 20]`` as the article did.
        likelihood: ``"poisson"`` (the article's) or ``"negbin"`` (negative binomial with
            one global dispersion: overdispersed sales; :class:`hbjax.NegativeBinomial`).
        mcse: stop when the Monte Carlo error of the averaged means is at most this many
            posterior sds (:class:`hbjax.convergence.Convergence`).
        seed: the PRNG seed of the fit (and of the minibatch sampler).
        checkpoint_dir: save the state there (``None``: no checkpoints).
        checkpoint_every: steps between checkpoints.
        resume: continue from ``checkpoint_dir``.
        progress: show a progress bar.
    """

    steps: int | None = None
    batch_size: int | None = None
    guide: str = DEFAULT_GUIDE
    rank: int = 8
    gradient: str | None = None
    particles: int = 4
    alpha: float = 0.0
    learning_rate: float = 0.01
    centre_prices: bool = True
    hierarchy: str = "centred"
    intercept_prior: str = "reference"
    clip: bool = False
    likelihood: str = "poisson"
    mcse: float = Convergence.mcse
    seed: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 1000
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.gradient is None:
            object.__setattr__(self, "gradient", "dreg" if self.alpha == 0 else "total")
        for name, allowed in (
            ("guide", GUIDES),
            ("hierarchy", HIERARCHIES),
            ("intercept_prior", INTERCEPT_PRIORS),
            ("likelihood", tuple(LIKELIHOODS)),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}."
                )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int | np.integer):
            raise ValueError(f"seed must be an int; got {self.seed!r}.")
        if not 0 <= self.seed < SEEDS:
            raise ValueError(f"seed must be from 0 to {SEEDS - 1}; got {self.seed}.")
        if self.guide == "lowrank" and self.batch_size is not None:
            raise ValueError(
                "the lowrank guide couples all products and cannot be minibatched; use the "
                "unitblock or meanfield guide with batch_size."
            )
        for name in ("particles", "rank", "checkpoint_every", "steps", "batch_size"):
            value = getattr(self, name)
            if value is None and name in ("steps", "batch_size"):
                continue
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}.")
        for name in ("learning_rate", "mcse"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0; got {value!r}.")
        if not (isinstance(self.alpha, int | float) and math.isfinite(self.alpha)):
            raise ValueError(f"alpha must be a finite number; got {self.alpha!r}.")
        self.bound()  # checks gradient, alpha and particles together

    def max_steps(self, n_units: int) -> int:
        """``steps``, or the default for a panel of ``n_units`` products."""
        if self.steps is not None:
            return self.steps
        if self.batch_size is None:
            return DEFAULT_STEPS
        return round(DEFAULT_EPOCHS * n_units / self.batch_size)

    def bound(self) -> RenyiBound:
        """The configured Rényi bound (an objective for :func:`hbjax.fit`)."""
        return RenyiBound(self.alpha, self.particles, self.gradient)

    def objective(self, model: AbstractModel, guide: PyTree, panel: PyTree, *, key: jax.Array):  # noqa: ANN201
        """The configured Rényi bound's loss (an objective for :func:`hbjax.fit`)."""
        return self.bound()(model, guide, panel, key=key)


#: FitConfig fields that do not change the fit (a resume may change them).
_NOT_IDENTITY = ("steps", "checkpoint_dir", "checkpoint_every", "resume", "progress")


def _identity(panel: Panel | GridStore, config: FitConfig) -> dict[str, object]:
    """What a checkpoint of this fit must match beyond the model: data content and config.

    The data's hash is of the host rows (one process), or of the per-unit sums every
    process shares (several processes; a grid folder): the same on any device count.
    """
    if isinstance(panel, GridStore):
        data: object = (panel.stats.moments, panel.stats.unit_group, panel.n_obs)
    elif jax.process_count() > 1:
        data = UnitStats.gather(panel)
    else:
        data = panel
    return fit_identity(data, config)


def fit_identity(data: object, config: FitConfig) -> dict[str, object]:
    """A checkpoint's ``fingerprint``: ``data``'s hash and ``config``'s fit-changing settings."""
    settings = {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.name not in _NOT_IDENTITY
    }
    return {"data (content hash)": checkpoint.content_hash(data), **settings}


@eqx.filter_jit
def _init_latents(model: ElasticityModel, data: PyTree) -> PyTree:
    """The data-informed start, compiled once (eagerly, each of its ops compiles alone)."""
    return model.init_latents(data)


def fit_elasticities(
    panel: Panel | GridStore,
    config: FitConfig = FitConfig(),  # frozen: a shared default is safe
    *,
    mesh: Mesh | None = None,
) -> FitResult:
    """The elasticity model fitted to ``panel`` as ``config`` says.

    Args:
        panel: a host panel (in a multi-process run, this process's rows from
            :func:`hbjax.sharding.read_process_panel`), or a grid folder
            (:func:`hbjax.read_grid`; with ``batch_size`` only).
        config: the choices.
        mesh: the devices (default: one device for a full-batch fit, all for a minibatch).

    Raises:
        ValueError: a grid folder without ``batch_size``, or a batch of all products.
    """
    key = jax.random.key(config.seed)
    stats = panel.stats if isinstance(panel, GridStore) else panel
    steps = config.max_steps(stats.n_units)
    options: dict[str, object] = {
        "clip_log_rate": ARTICLE_CLIP if config.clip else None,
        "likelihood": config.likelihood,
    }
    optimizer = default_optimizer(config.learning_rate)
    data: Panel | UnitStats = stats
    rows: object = panel
    batch_size = config.batch_size
    if batch_size is not None:
        if batch_size >= stats.n_units:
            raise ValueError(
                f"batch_size {batch_size} is not smaller than the number of products "
                f"({stats.n_units}); leave it out to fit the full batch."
            )
        # The rows stay on the host; the centres and the start come from every process's
        # per-unit sums. The learning rate decays per epoch.
        if isinstance(panel, GridStore):
            # the sampler fit() would make from the same key: the same batches as the table
            rows = panel.sampler(batch_size, mesh=mesh, seed=seed_from_key(key))
            batch_size = None
        else:
            data = UnitStats.gather(panel)
        per_epoch = data.n_units / (config.batch_size or rows.batch_size)
        optimizer = default_optimizer(
            config.learning_rate, transition_steps=round(1000 * per_epoch)
        )
    elif isinstance(panel, GridStore):
        raise ValueError("a grid folder (hbjax prepare) is fitted with batch_size only.")
    elif mesh is not None:
        # Place first: in a multi-process run this process holds only its own units' rows,
        # and the price centres and the start must come from every process's rows.
        layout = ElasticityModel.from_panel(panel, centre_prices=False, **options).panel_layout()
        rows = data = shard_panel(panel, mesh, layout=layout)
    model = ElasticityModel.from_panel(
        data,
        centre_prices=config.centre_prices,
        hierarchy=config.hierarchy,
        intercept_prior=config.intercept_prior,
        **options,
    )
    start = make_guide(
        config.guide,
        model,
        loc=_init_latents(model, data),
        rank=config.rank,
        key=jax.random.fold_in(key, 1),
    )
    start = start_dispersion_scale(start, model.likelihood, stats.n_units * stats.n_periods)
    return fit(
        model,
        start,
        rows,
        key=key,
        steps=steps,
        optimizer=optimizer,
        objective=config.objective,
        progress=config.progress,
        mesh=mesh,
        batch_size=batch_size,
        checkpoint_dir=config.checkpoint_dir,
        checkpoint_every=config.checkpoint_every,
        resume=config.resume,
        convergence=Convergence(mcse=config.mcse),
        fingerprint=None if config.checkpoint_dir is None else _identity(panel, config),
    )


def start_dispersion_scale(
    guide: AbstractGuide, likelihood: AbstractCountLikelihood, n_obs: int
) -> AbstractGuide:
    """The guide with its ``dispersion`` latent's sd started at the likelihood's guess.

    A likelihood parameter's posterior sd is far below the guides' usual starting 0.1
    (:meth:`~hbjax.AbstractCountLikelihood.starting_scale`); from 0.1 Adam spends
    thousands of steps shrinking it (benchmarks/README.md). Unchanged without one.
    """
    scale = likelihood.starting_scale(n_obs)
    if scale is None:
        return guide
    return eqx.tree_at(
        lambda g: g.raw_scale.dispersion, guide, inverse_softplus(jnp.asarray(scale, jnp.float32))
    )


__all__ = [
    "fit_identity",
    "DEFAULT_EPOCHS",
    "DEFAULT_GUIDE",
    "DEFAULT_STEPS",
    "FitConfig",
    "fit_elasticities",
    "start_dispersion_scale",
]
