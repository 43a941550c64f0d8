"""One optimisation step for every kind of fit, in the optax/blackjax manner.

>>> svi = SVI(model, objective, optimizer)
>>> state = svi.init(guide, mesh)  # placed as the step returns it: one compile
>>> state, info = eqx.filter_jit(svi.step)(state, batch, key)

``batch`` is whatever the objective takes: a placed panel (full batch, 1..N devices, many
hosts) or a batch of whole units (:class:`~hbjax.AbstractUnitBatch`). For a
minibatch, only the drawn units' parameters and their optimiser state move
(:func:`lazy_units`, an optax-style wrapper); shared parameters move every step.

The state also carries the Polyak–Ruppert average of the iterates from the step
``average_from`` on (set by the loop's convergence check; :mod:`hbjax.vi.convergence`):
:meth:`SVI.guide` returns the averaged guide once averaging has begun.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from .._types import Bool, Int, PRNGKeyArray, PyTree, Scalar, float_dtype
from .devices import replicate
from .guide import AbstractGuide, GaussianGuide
from .model import AbstractModel, AbstractUnitBatch, units_in_batch
from .objectives import AbstractObjective

#: A loss to minimise: ``objective(model, guide, batch, *, key) -> scalar``.
Objective = Callable[..., Scalar]

#: ``average_from`` of a state that is not averaging (yet).
NEVER = np.iinfo(np.int32).max

_TRUE = np.True_


class SVIState(eqx.Module):
    """Everything a fit carries from step to step (a pytree; checkpointed whole).

    Attributes:
        guide: the current iterate.
        opt_state: the optimiser's state.
        step: steps done.
        average: the guide's parameters averaged over steps ``average_from ..
            step - 1`` (equal to ``guide``'s before averaging begins).
        average_from: the first averaged step; :data:`NEVER` while not averaging.
    """

    guide: AbstractGuide
    opt_state: PyTree
    step: Int[Any, ""]
    average: PyTree
    average_from: Int[Any, ""]


class StepInfo(NamedTuple):
    """What one step reports: its loss (before the update) and whether all is finite."""

    loss: Scalar
    finite: Bool[Any, ""]


def all_finite(tree: PyTree) -> Bool[jax.Array, ""]:
    """Whether every inexact array in ``tree`` is finite (a scalar bool)."""
    arrays = jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
    if not arrays:
        return jnp.asarray(_TRUE)
    # one reduction over every entry, not a chain of per-leaf scalars: XLA copies cheap
    # scalar chains into each consumer (it may still split this one; the loop keeps the
    # result away from the leaves' updates: hbjax.vi.loop)
    return jnp.all(jnp.concatenate([jnp.isfinite(x).ravel() for x in arrays]))


def scale_by_sd(sd_unit: float) -> optax.GradientTransformation:
    """Each update times ``min(1, sd / sd_unit)``: ``sd`` from the guide's ``step_scales()``.

    Chained after Adam, whose steps are about ``learning_rate`` long whatever a
    parameter's scale: a mean whose posterior sd is below ``sd_unit`` then moves at most
    ``learning_rate / sd_unit`` of its sd a step. At lr 0.01 a best seller's elasticity
    (sd ~0.005) otherwise jitters by two sds a step and the fit cannot stop; means wider
    than ``sd_unit`` (group means, a dispersion: their gradients are noisy sums over many
    units, and larger steps average the noise out sooner) keep Adam's steps. ``params``
    that are not a Gaussian guide pass through unchanged. With ``optax.multi_transform``
    (:func:`hbjax.vi.guide.part_labels`) it may go after the multi-transform or inside
    a part's chain: there the other parts' leaves are optax's empty ``MaskedNode``.
    """
    if not sd_unit > 0:
        raise ValueError(f"sd_unit must be > 0; got {sd_unit}.")

    def update(updates: PyTree, state: Any, params: PyTree = None) -> tuple[PyTree, Any]:
        if not isinstance(params, GaussianGuide):
            return updates, state
        factor = lambda u, sd: u * jnp.minimum(1.0, sd / sd_unit).astype(u.dtype)  # noqa: E731
        return jax.tree.map(factor, updates, params.step_scales()), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def lazy_units(
    optimizer: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
    """``optimizer`` that leaves the entries outside ``update_mask`` exactly as they were.

    ``update(updates, state, params, update_mask=mask)``: ``mask`` is a pytree of booleans
    like ``params`` (broadcastable leaves), e.g. a guide's
    :meth:`~hbjax.AbstractMinibatchGuide.unit_update_mask` for a minibatch. Masked-out entries get
    a zero update and keep their optimiser state (lazy Adam: no stale momentum moves a
    unit that was not drawn). Without ``update_mask`` it is ``optimizer`` unchanged.
    """

    def init(params: PyTree) -> Any:
        return optimizer.init(params)

    def update(
        updates: PyTree, state: Any, params: PyTree = None, *, update_mask: PyTree = None, **_: Any
    ) -> tuple[PyTree, Any]:
        new_updates, new_state = optimizer.update(updates, state, params)
        if update_mask is None:
            return new_updates, new_state
        new_updates = jax.tree.map(lambda u, m: jnp.where(m, u, 0.0), new_updates, update_mask)
        masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731 - multi_transform's
        state_mask = optax.tree_utils.tree_map_params(
            optimizer,
            lambda s, m: s if masked(s) else m,  # another part's slot: no state here
            state,
            update_mask,
            transform_non_params=lambda v: jax.tree.map(lambda _: _TRUE, v),
            is_leaf=masked,
        )
        new_state = jax.tree.map(
            lambda m, new, old: jnp.where(m, new, old), state_mask, new_state, state
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init, update)


class SVI(eqx.Module):
    """Stochastic variational inference: ``init`` and ``step`` for one model and objective.

    Attributes:
        model: the model (its arrays are leaves: pass the ``SVI`` into ``jit``, not a closure).
        objective: ``objective(model, guide, batch, *, key) -> loss`` to minimise; an
            :class:`~hbjax.vi.objectives.AbstractObjective` is also given ``step=`` (the
            steps done), so its options may follow schedules; its arrays are leaves.
        optimizer: the optimiser, wrapped in :func:`lazy_units`.
    """

    model: AbstractModel
    objective: Objective
    optimizer: optax.GradientTransformationExtraArgs = eqx.field(static=True)

    def __init__(
        self,
        model: AbstractModel,
        objective: Objective,
        optimizer: optax.GradientTransformation,
    ):
        """Build the step of ``objective`` for ``model``, optimised with ``optimizer``."""
        self.model = model
        self.objective = objective
        self.optimizer = lazy_units(optimizer)

    def init(self, guide: AbstractGuide, mesh: Mesh | None = None) -> SVIState:
        """The state at step 0 for the starting ``guide``.

        With the ``mesh`` the batches are placed on, the state is replicated over it, as
        :meth:`step` returns it: a jitted step then compiles once, not again at its second
        call (unplaced arrays are another input placement). Without, on the default device.
        """
        params = eqx.filter(guide, eqx.is_inexact_array)
        state = SVIState(
            guide=guide,
            opt_state=self.optimizer.init(params),
            step=jnp.int32(0),
            average=params,
            average_from=jnp.int32(NEVER),
        )
        arrays, static = eqx.partition(state, eqx.is_array)
        if mesh is None:
            arrays = jax.device_put(arrays, jax.local_devices()[0])
        else:
            arrays = replicate(arrays, mesh)
        return eqx.combine(arrays, static)

    def step(self, state: SVIState, batch: PyTree, key: PRNGKeyArray) -> tuple[SVIState, StepInfo]:
        """One step of the objective on ``batch`` with ``key``.

        Returns the new state and its :class:`StepInfo`; ``finite`` says whether the loss,
        every gradient and every new parameter are finite (the caller decides what to do
        with a non-finite step; :func:`hbjax.fit` keeps the last good state).
        """
        model = self.model

        told = {"step": state.step} if isinstance(self.objective, AbstractObjective) else {}

        def loss_fn(guide: AbstractGuide) -> Scalar:
            return self.objective(model, guide, batch, key=key, **told)

        loss, grads = eqx.filter_value_and_grad(loss_fn)(state.guide)
        params = eqx.filter(state.guide, eqx.is_inexact_array)
        extra = {}
        if isinstance(batch, AbstractUnitBatch):
            unit_leaves = model.unit_leaves()
            extra["update_mask"] = state.guide.unit_update_mask(units_in_batch(batch), unit_leaves)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, params, **extra)
        guide = eqx.apply_updates(state.guide, updates)
        new_params = eqx.filter(guide, eqx.is_inexact_array)
        averaged = state.step - state.average_from + 1  # iterates averaged after this one
        weight = 1.0 / jnp.maximum(averaged, 1).astype(float_dtype())
        average = jax.tree.map(
            lambda avg, new: jnp.where(averaged >= 1, avg + weight * (new - avg), new),
            state.average,
            new_params,
        )
        finite = jnp.isfinite(loss) & all_finite(grads) & all_finite(new_params)
        new_state = SVIState(guide, opt_state, state.step + 1, average, state.average_from)
        return new_state, StepInfo(loss, finite)

    def guide(self, state: SVIState) -> AbstractGuide:
        """The reported guide: the averaged iterates once averaging began, else the iterate."""
        if int(state.average_from) >= int(state.step):
            return state.guide
        return eqx.combine(
            state.average, eqx.filter(state.guide, eqx.is_inexact_array, inverse=True)
        )


def start_averaging(state: SVIState, step: Int[Any, ""]) -> SVIState:
    """``state`` with averaging from ``step`` on (a step not yet taken: the average restarts)."""
    return eqx.tree_at(lambda s: s.average_from, state, step)


__all__ = [
    "NEVER",
    "SVI",
    "SVIState",
    "StepInfo",
    "all_finite",
    "lazy_units",
    "scale_by_sd",
    "start_averaging",
]
