"""A vocabulary model fitted as a :class:`~hbjax.FitConfig` says.

What ``hbjax fit`` runs for ``--group a,b`` or ``--covariates``.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh

from ..convergence import Convergence
from ..fit import FitResult, default_optimizer, fit
from ..guide import make_guide
from ..parallel.blocks import make_mesh
from ..parallel.layouts import AbstractLayout, Auto, Dense, Rows, as_layout
from ..pipeline import FitConfig, fit_identity, start_dispersion_scale
from .frame import CountData
from .grid import GridError


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
    placed = _placed(data, mesh, layout, config.batch_size)
    optimizer = default_optimizer(config.learning_rate)
    if config.batch_size is not None:
        if config.batch_size >= model.n_units:
            raise ValueError(
                f"batch_size {config.batch_size} is not smaller than the number of units "
                f"({model.n_units}); leave it out to fit the full batch."
            )
        per_epoch = model.n_units / config.batch_size
        optimizer = default_optimizer(
            config.learning_rate, transition_steps=round(1000 * per_epoch)
        )
    guide = make_guide(
        config.guide,
        model,
        loc=model.init_latents(rows),
        rank=config.rank,
        key=jax.random.fold_in(key, 1),
    )
    guide = start_dispersion_scale(guide, model.likelihood, len(rows.unit))
    return fit(
        model,
        guide,
        placed,
        key=key,
        steps=config.max_steps(model.n_units),
        optimizer=optimizer,
        objective=config.objective,
        progress=config.progress,
        mesh=mesh,
        batch_size=config.batch_size,
        convergence=Convergence(mcse=config.mcse),
        checkpoint_dir=config.checkpoint_dir,
        checkpoint_every=config.checkpoint_every,
        resume=config.resume,
        fingerprint=None if config.checkpoint_dir is None else fit_identity(rows, config),
    )


def _placed(
    data: CountData, mesh: Mesh, layout: str | AbstractLayout, batch_size: int | None
) -> object:
    """The data ``fit`` gets: a placed grid, or the host rows (placed or sampled by ``fit``)."""
    layout = as_layout("dense" if layout == "grid" else layout)
    if isinstance(layout, Dense) and batch_size is not None:
        raise ValueError("the grid layout is for full-batch fits; minibatches draw rows.")
    if isinstance(layout, Rows) or batch_size is not None:
        return data.rows
    if isinstance(layout, Auto) and isinstance(layout.choose(data.grid_fill), Rows):
        return data.rows
    try:
        return data.grid(mesh, cell_chunk=layout.cell_chunk)
    except GridError:
        if isinstance(layout, Dense):  # asked for by name: say why not
            raise
        return data.rows


__all__ = ["fit_counts"]
