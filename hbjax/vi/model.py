"""What a model is, and what a model that can be minibatched adds (JAX and Equinox only).

A model is an Equinox module whose latents' structure is declared up front
(:meth:`AbstractModel.latent_shapes`), so a guide can be built before any data is seen.
``log_joint(latents, data)`` is a pure scalar function of one set of latents.

Capabilities are abstract base classes, checked when a model is built (Equinox's
abstract/final pattern): a model that can be fitted on minibatches of whole units is an
:class:`AbstractUnitModel`, and says which latents are per unit and how to weigh a batch.
"""

from __future__ import annotations

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PyTree, Scalar

from .._types import AnyArray, float_dtype


class ParentLink(eqx.Module):
    """A latent leaf whose entries each sit under one entry of another leaf (a hierarchy).

    Attributes:
        child: the child leaf's position among the flattened latents.
        parent: the parent leaf's position.
        index: ``[*child]`` each child entry's parent entry (its last axis); ``None``: the
            parent is a scalar, every entry sits under it.
    """

    child: int = eqx.field(static=True)
    parent: int = eqx.field(static=True)
    index: Int[Array, "..."] | None = None


class AbstractModel(eqx.Module):
    """Interface of a model: latent structure, prior, likelihood, natural-scale values.

    The data argument (``panel``) is :class:`~hbjax.UnitRows` for an
    :class:`~hbjax.AbstractRowModel` (or its placed forms), and any pytree of arrays for a
    model of your own.
    """

    @abc.abstractmethod
    def latent_shapes(self) -> PyTree[jax.ShapeDtypeStruct]:
        """Structure, shapes and dtypes of the (non-centred) latents."""

    @abc.abstractmethod
    def log_prior(self, latents: PyTree[Float[Array, "..."]]) -> Scalar:
        """Log prior density of one set of latents."""

    @abc.abstractmethod
    def log_likelihood(self, latents: PyTree[Float[Array, "..."]], panel: PyTree) -> Scalar:
        """Log-likelihood of the panel given one set of latents."""

    def log_joint(self, latents: PyTree[Float[Array, "..."]], panel: PyTree) -> Scalar:
        """``log p(latents) + log p(panel | latents)``."""
        return self.log_prior(latents) + self.log_likelihood(latents, panel)

    def natural(self, latents: PyTree[Float[Array, "..."]]) -> PyTree[Float[Array, "..."]]:
        """Latents on the natural (reported) scale; the identity unless overridden."""
        return latents

    def init_latents(self, panel: PyTree) -> PyTree[Float[Array, "..."]]:
        """A starting point for a guide's location; zeros unless overridden."""
        del panel
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self.latent_shapes())

    def unit_leaves(self) -> PyTree[bool] | None:
        """Which latent leaves are per unit (unit axis last); ``None``: no unit structure.

        An :class:`AbstractUnitModel` must declare them (its minibatches subsample them).
        """
        return None

    def parent_links(self) -> tuple[ParentLink, ...]:
        """Which latent leaves sit under which, parents' links before their children's.

        What :class:`~hbjax.vi.guide.DependentNormal` couples; none by default.
        """
        return ()

    def reported_leaves(self) -> PyTree[bool]:
        """Which latent leaves carry what a fit reports: the convergence check watches them.

        Every leaf by default; a model with nuisance latents narrows it.
        """
        return jax.tree.map(lambda _: True, self.latent_shapes())


class AbstractUnitBatch(eqx.Module):
    """A minibatch of whole units: which units fill its slots and what each weighs.

    Slots come in equal runs, one per block of the sharding plan; a chunk of steps'
    batches has a leading ``step`` axis. Padding slots weigh 0.

    Attributes:
        unit: ``[slot]`` global unit index of each slot.
        weight: ``[slot]`` units in the slot's block / units drawn from it; 0 for padding.
        n_units: units in the whole data set.
    """

    unit: eqx.AbstractVar[Int[AnyArray, "*step slot"]]
    weight: eqx.AbstractVar[Float[AnyArray, "*step slot"]]
    n_units: eqx.AbstractVar[int]


def units_in_batch(batch: AbstractUnitBatch) -> Bool[Array, " unit"]:
    """``[unit]`` whether each unit is in the batch (with a non-zero weight)."""
    present = (jnp.asarray(batch.weight) > 0).astype(float_dtype())
    hits = jnp.zeros(batch.n_units, present.dtype).at[batch.unit].max(present)
    return hits > 0


class AbstractUnitModel(AbstractModel):
    """A model of exchangeable units given shared latents: it can be minibatched.

    Its unit latents (:meth:`unit_leaves`, each ``[unit]``) enter the likelihood only
    through their own unit's data, so a step may draw a batch of whole units and weigh
    their terms up (:meth:`batch_log_joint`); the guide's per-unit checks read each
    unit's own terms (:meth:`slot_log_joint`).
    """

    @abc.abstractmethod
    def unit_leaves(self) -> PyTree[bool]:
        """Which latent leaves are per unit (each ``[unit]``): what minibatches subsample."""

    @abc.abstractmethod
    def batch_log_joint(
        self, latents: PyTree[Float[Array, "..."]], batch: AbstractUnitBatch
    ) -> Scalar:
        """Unbiased estimate of :meth:`log_joint` from a batch of units.

        ``latents`` hold the batch's slots in the unit leaves (``[slot]``); each slot's
        prior and likelihood terms are weighted by ``batch.weight``, shared ones by 1.
        """

    @abc.abstractmethod
    def slot_log_joint(
        self, latents: PyTree[Float[Array, "..."]], batch: AbstractUnitBatch
    ) -> Float[Array, " slot"]:
        """Each slot's own terms of the log joint, unweighted.

        ``log p(z_i | shared) + log p(data of unit i | z_i, shared)`` for the unit latents
        ``z_i`` of each slot (the per-unit guide checks of :mod:`hbjax.vi.checks`).
        """


__all__ = [
    "AbstractModel",
    "AbstractUnitBatch",
    "AbstractUnitModel",
    "ParentLink",
    "units_in_batch",
]
