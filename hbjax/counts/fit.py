"""Count data fitted as a :class:`FitConfig` says: what ``hbjax fit`` and ``demo`` run."""

from __future__ import annotations

import dataclasses
import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from .._types import PyTree
from ..parallel.blocks import make_mesh
from ..parallel.layouts import AbstractLayout, Auto, Dense, Rows, as_layout
from ..vi import checkpoint
from ..vi.checkpoint import Checkpoints
from ..vi.convergence import Convergence
from ..vi.fit import FitResult, default_optimizer, fit
from ..vi.guide import GUIDES, AbstractGuide, DependentNormal, inverse_softplus, make_guide
from ..vi.host import FullBatch, Minibatches
from ..vi.model import AbstractModel
from ..vi.objectives import RenyiBound
from .frame import CountData
from .grid import GridError
from .regression import CountLatents

#: The most steps of a fit, or of a minibatch fit the most epochs if those are more steps:
#: the convergence rule stops a fit, the cap only bounds its work (250 epochs of a small
#: table, 938 steps, stopped a fit unconverged that needed 8,000).
DEFAULT_STEPS, DEFAULT_EPOCHS = 20_000, 250
#: The default guide (benchmarks/README.md, "Intervals against NUTS").
DEFAULT_GUIDE = "unitblock"
#: Seeds are whole numbers below this (what every command and ``FitConfig`` accept).
SEEDS = 2**32
#: A whole number: Python's or NumPy's.
IntLike = int | np.integer


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """Every choice of the standard fit of count data (the ``hbjax fit`` flags).

    The model's own options (likelihood, hierarchy, centring, clip) belong to the data:
    :func:`hbjax.counts.from_frame`, :func:`hbjax.counts.elasticity_data`.

    Attributes:
        steps: the most steps (the fit stops once converged); ``None``: 20,000, or with
            ``batch_size`` 250 epochs where those are more.
        batch_size: products per step (minibatch SVI); ``None``: full batch.
        guide: ``"meanfield"``, ``"unitblock"`` or ``"lowrank"`` (:data:`hbjax.GUIDES`).
        rank: the low-rank guide's rank.
        dependent: each hierarchy's children follow their parents' draws
            (:class:`hbjax.vi.guide.DependentNormal` over the mean-field or unit-block
            guide); ``None``: yes but for ``"lowrank"``.
        gradient: ``"total"``, ``"dreg"`` or ``"stl"`` (:class:`hbjax.RenyiBound`);
            ``None``: ``"dreg"`` for ``alpha = 0`` (fewer steps to converge), else
            ``"total"``.
        particles: importance particles ``K``.
        alpha: Rényi alpha (0: importance-weighted bound).
        learning_rate: Adam's initial rate (decayed per 1,000 steps, or per 1,000 epochs;
            :func:`hbjax.default_optimizer`).
        precondition: no mean moves more than half its posterior sd a step
            (:func:`hbjax.vi.step.scale_by_sd`); ``False``: the article's AdamW.
        mcse: stop when the Monte Carlo error of the averaged means is at most this many
            posterior sds (:class:`hbjax.vi.convergence.Convergence`).
        seed: the PRNG seed of the fit (and of the minibatch sampler).
        checkpoint_dir: save the state there (``None``: no checkpoints).
        checkpoint_every: steps between checkpoints.
        resume: continue from ``checkpoint_dir``.
        progress: show a progress bar.
    """

    steps: IntLike | None = None
    batch_size: IntLike | None = None
    guide: str = DEFAULT_GUIDE
    rank: IntLike = 8
    dependent: bool | None = None
    gradient: str | None = None
    particles: IntLike = 4
    alpha: float = 0.0
    learning_rate: float = 0.01
    precondition: bool = True
    mcse: float = Convergence.mcse
    seed: IntLike = 0
    checkpoint_dir: str | None = None
    checkpoint_every: IntLike = 1000
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.gradient is None:
            object.__setattr__(self, "gradient", "dreg" if self.alpha == 0 else "total")
        if self.guide not in GUIDES:
            raise ValueError(f"guide must be one of {', '.join(GUIDES)}; got {self.guide!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int | np.integer):
            raise ValueError(f"seed must be an int; got {self.seed!r}.")
        if not 0 <= self.seed < SEEDS:
            raise ValueError(f"seed must be from 0 to {SEEDS - 1}; got {self.seed}.")
        object.__setattr__(self, "seed", int(self.seed))
        if self.dependent is None:
            object.__setattr__(self, "dependent", self.guide != "lowrank")
        if self.guide == "lowrank" and self.dependent:
            raise ValueError("a dependent guide moves a meanfield or unitblock guide, not lowrank.")
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
            object.__setattr__(self, name, int(value))  # a NumPy integer is welcome
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
        return max(DEFAULT_STEPS, round(DEFAULT_EPOCHS * n_units / self.batch_size))

    def bound(self) -> RenyiBound:
        """The configured Rényi bound (an objective for :func:`hbjax.fit`)."""
        return RenyiBound(self.alpha, self.particles, self.gradient)

    def objective(self, model: AbstractModel, guide: PyTree, data: PyTree, *, key: jax.Array):  # noqa: ANN201
        """The configured Rényi bound's loss (an objective for :func:`hbjax.fit`)."""
        return self.bound()(model, guide, data, key=key)


#: FitConfig fields that do not change the fit (a resume may change them).
_NOT_IDENTITY = ("steps", "checkpoint_dir", "checkpoint_every", "resume", "progress")


def fit_counts(
    data: CountData,
    config: FitConfig = FitConfig(),
    *,
    mesh: Mesh | None = None,
    layout: str | AbstractLayout = "auto",
) -> FitResult:
    """Fit ``data.model`` to ``data.rows`` as ``config`` says.

    Sharded over ``mesh`` (default all devices), minibatched with ``config.batch_size``,
    stopped when converged (at most ``config.max_steps``), checkpointed and resumed as
    ``config`` says (a resume must use the same table and settings).

    ``layout`` (:mod:`hbjax.parallel.layouts`, a module or its name): ``Dense()`` or
    ``"grid"`` (the dense kernel on :meth:`CountData.grid`: full batch, needs
    ``from_frame(..., period=)``; ``Dense(cell_chunk=k)`` sums ``k`` slots before each
    effect's scatter, by default 1 on CPU and up to 64 on a GPU), ``Rows()`` or ``"rows"``, or
    ``Auto()``/``"auto"`` (default): the grid for a full-batch fit with one row per unit
    and period that fills at least ``Auto().min_fill`` of the unit x period cells, else
    the rows. A resume should keep the layout: the sums' order, and so the last bits,
    differ.

    The guide starts at :meth:`CountRegression.init_latents` and, for a negative binomial,
    with the dispersion's sd at its expected posterior sd. ``config``'s price-specific
    options (``centre_prices``, ``clip``, ``hierarchy``, ``intercept_prior``,
    ``likelihood``) belong to :func:`hbjax.counts.from_frame` here and are not read.
    """
    model, rows = data.model, data.rows
    if rows is None:
        raise ValueError(
            "data holds no rows (a saved fit keeps the model and labels only); build it "
            "with hbjax.counts.from_frame to fit."
        )
    key = jax.random.key(config.seed)
    mesh = make_mesh() if mesh is None else mesh
    source = _source(data, mesh, layout, config.batch_size)
    # `fit` sets its decay: per 1,000 passes over the data
    optimizer = functools.partial(
        default_optimizer, config.learning_rate, precondition=config.precondition
    )
    guide = make_guide(
        config.guide,
        model,
        loc=model.init_latents(rows),
        rank=config.rank,
        key=jax.random.fold_in(key, 1),
        dependent=config.dependent,
    )
    guide = start_scales(guide, model.starting_scales(rows))
    return fit(
        model,
        guide,
        source,
        key=key,
        steps=config.max_steps(model.n_units),
        optimizer=optimizer,
        objective=config.objective,
        progress=config.progress,
        convergence=Convergence(mcse=config.mcse),
        checkpoints=None
        if config.checkpoint_dir is None
        else Checkpoints(
            config.checkpoint_dir,
            every=config.checkpoint_every,
            resume=config.resume,
            fingerprint=fit_identity(data, config),
        ),
    )


def fit_identity(data: CountData, config: FitConfig) -> dict[str, object]:
    """A checkpoint's ``fingerprint``: the rows' hash, the model's spec, the fit's settings."""
    settings = {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.name not in _NOT_IDENTITY
    }
    spec = None if data.spec is None else data.spec.to_json()
    return {"data (content hash)": checkpoint.content_hash(data.rows), "model": spec, **settings}


def start_scales(guide: AbstractGuide, scales: CountLatents) -> AbstractGuide:
    """The guide (one of hbjax's, with ``raw_scale``) with sds started at ``scales``.

    ``scales``: :meth:`~hbjax.counts.regression.CountRegression.starting_scales`, about
    the posterior sd of the latents it has a guess for (NaN elsewhere: left as it was). A
    week's effect in a category with a best seller, or a likelihood parameter, has a
    posterior sd far below the guides' usual starting 0.1; from there Adam spends
    thousands of steps shrinking it (benchmarks/README.md), and a fit that stops once the
    watched values settle reports those intervals too wide.
    """

    def start(raw: jax.Array, scale: np.ndarray | np.floating) -> jax.Array:
        scale = np.broadcast_to(np.asarray(scale, np.float64), np.shape(raw))
        given = inverse_softplus(jnp.asarray(np.nan_to_num(scale, nan=1.0), raw.dtype))
        return jnp.where(jnp.asarray(np.isnan(scale)), raw, given)

    if isinstance(guide, DependentNormal):
        return eqx.tree_at(lambda g: g.base, guide, start_scales(guide.base, scales))
    return eqx.tree_at(lambda g: g.raw_scale, guide, jax.tree.map(start, guide.raw_scale, scales))


def _source(
    data: CountData, mesh: Mesh, layout: str | AbstractLayout, batch_size: int | None
) -> FullBatch | Minibatches:
    """The data source ``fit`` gets: minibatches of the rows, the placed grid, or the rows."""
    layout = as_layout("dense" if layout == "grid" else layout)
    if batch_size is not None:
        if isinstance(layout, Dense):
            raise ValueError("the grid layout is for full-batch fits; minibatches draw rows.")
        return Minibatches(data.rows, batch_size, mesh=mesh)
    if isinstance(layout, Rows):
        return FullBatch(data.rows, mesh)
    if isinstance(layout, Auto) and isinstance(layout.choose(data.grid_fill), Rows):
        return FullBatch(data.rows, mesh)
    try:
        return FullBatch(data.grid(mesh, cell_chunk=layout.cell_chunk))
    except GridError:
        if isinstance(layout, Dense):  # asked for by name: say why not
            raise
        return FullBatch(data.rows, mesh)


__all__ = [
    "DEFAULT_EPOCHS",
    "DEFAULT_GUIDE",
    "DEFAULT_STEPS",
    "SEEDS",
    "FitConfig",
    "fit_counts",
    "fit_identity",
    "start_scales",
]
