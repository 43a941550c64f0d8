"""Guides: variational families q(latents) as Equinox modules.

A guide mirrors the model's latent pytree and exposes
``sample_and_log_prob(num_particles, *, key)``: particles with a leading ``particle`` axis
and their log density under q. Constrained parameters are stored raw and transformed on
use (``scale = softplus(raw_scale)``). Where ``stop_gradient`` goes (stick-the-landing,
DReG) is a choice of the objective, not a new class: :meth:`AbstractGuide.log_prob` can be
evaluated on a ``stop_gradient``-ed copy of the guide.
"""

from __future__ import annotations

import abc
import math

import distrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

from ._types import ParticleFloat

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_TRUE = np.True_


def inverse_softplus(x: Float[Array, "*s"]) -> Float[Array, "*s"]:
    """The ``raw`` value whose softplus is ``x`` (x > 0)."""
    x = jnp.asarray(x)
    return x + jnp.log(-jnp.expm1(-x))


class AbstractGuide(eqx.Module):
    """Interface of a guide: draw particles and score them."""

    @abc.abstractmethod
    def sample(self, num_particles: int, *, key: PRNGKeyArray) -> PyTree[Float[Array, "..."]]:
        """Draw ``num_particles`` reparameterised particles (leading ``particle`` axis)."""

    @abc.abstractmethod
    def log_prob(self, particles: PyTree[Float[Array, "..."]]) -> ParticleFloat:
        """Log density under q of each particle (leading ``particle`` axis)."""

    def sample_and_log_prob(
        self, num_particles: int, *, key: PRNGKeyArray, weights: PyTree | None = None
    ) -> tuple[PyTree[Float[Array, "..."]], ParticleFloat]:
        """Particles and their log density; gradients flow through both (the total gradient).

        ``weights`` (minibatching: a pytree like the latents of scalars or ``[slot]``
        arrays) weights each latent's log-density term; only guides that factorise over
        latents (e.g. :class:`MeanFieldNormal`) support it.
        """
        if weights is not None:
            raise NotImplementedError(
                f"{type(self).__name__} does not support weighted log densities (minibatching)."
            )
        particles = self.sample(num_particles, key=key)
        return particles, self.log_prob(particles)

    def restrict(self, units: Int[Array, " slot"], unit_leaves: PyTree[bool]) -> AbstractGuide:
        """The guide of a batch's latents: per-unit leaves taken at ``units`` (minibatching).

        Gradients flow back to the selected units' parameters only.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not support minibatching (restrict); fit it without "
            "batch_size."
        )

    def unit_update_mask(self, in_batch: Bool[Array, " unit"], unit_leaves: PyTree[bool]) -> PyTree:
        """Booleans like the guide's parameters: which entries a batch step may update."""
        raise NotImplementedError(
            f"{type(self).__name__} does not support minibatching (unit_update_mask)."
        )


class MeanFieldNormal(AbstractGuide):
    """Independent normals over every latent: ``z ~ N(loc, softplus(raw_scale))``.

    Attributes:
        loc: pytree of means, the same structure as the model's latents.
        raw_scale: pytree of unconstrained scales (``scale = softplus(raw_scale)``).

    Example:
        >>> import jax, hbjax
        >>> sim = hbjax.simulate(n_units=20, n_periods=8, n_groups=2)
        >>> panel, _ = hbjax.from_frame(sim.frame)
        >>> model = hbjax.ElasticityModel.from_panel(panel)
        >>> guide = hbjax.MeanFieldNormal.from_shapes(model.latent_shapes())
        >>> z, log_q = guide.sample_and_log_prob(4, key=jax.random.key(0))
        >>> log_q.shape
        (4,)
    """

    loc: PyTree[Float[Array, "..."]]
    raw_scale: PyTree[Float[Array, "..."]]

    @classmethod
    def from_shapes(
        cls,
        shapes: PyTree[jax.ShapeDtypeStruct],
        *,
        loc: PyTree | None = None,
        scale: float = 0.1,
    ) -> MeanFieldNormal:
        """A guide for latents of the given shapes, built before any data is seen.

        Args:
            shapes: the model's ``latent_shapes()``.
            loc: starting means (e.g. ``model.init_latents(panel)``); zeros by default.
            scale: starting standard deviation of every latent.
        """
        if not scale > 0:
            raise ValueError(f"scale must be > 0; got {scale}.")
        if loc is None:
            loc = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        else:
            expected = jax.tree.structure(shapes)
            if jax.tree.structure(loc) != expected:
                raise ValueError(
                    f"loc has structure {jax.tree.structure(loc)}, expected {expected}."
                )
            loc = jax.tree.map(lambda s, x: jnp.asarray(x, s.dtype).reshape(s.shape), shapes, loc)
        raw = inverse_softplus(jnp.float32(scale))
        raw_scale = jax.tree.map(lambda s: jnp.full(s.shape, raw, s.dtype), shapes)
        return cls(loc=loc, raw_scale=raw_scale)

    @property
    def scale(self) -> PyTree[Float[Array, "..."]]:
        """Standard deviations, ``softplus(raw_scale)``."""
        return jax.tree.map(jax.nn.softplus, self.raw_scale)

    def sample(self, num_particles: int, *, key: PRNGKeyArray) -> PyTree[Float[Array, "..."]]:
        """``loc + scale * eps`` with ``eps ~ N(0, I)``, one key per leaf."""
        leaves, treedef = jax.tree.flatten(self.loc)
        scales = jax.tree.leaves(self.scale)
        keys = jax.random.split(key, len(leaves))
        draws = [
            loc + scale * jax.random.normal(k, (num_particles, *loc.shape), loc.dtype)
            for loc, scale, k in zip(leaves, scales, keys, strict=True)
        ]
        return jax.tree.unflatten(treedef, draws)

    def sample_and_log_prob(
        self, num_particles: int, *, key: PRNGKeyArray, weights: PyTree | None = None
    ) -> tuple[PyTree[Float[Array, "..."]], ParticleFloat]:
        """Particles ``loc + scale * eps`` and ``log q = sum(-eps^2 / 2 - log scale) - c``.

        The same value and total gradient as ``log_prob(sample(...))``, from ``eps``
        directly (no division by the scale). ``weights``: see
        :meth:`AbstractGuide.sample_and_log_prob`.
        """
        leaves, treedef = jax.tree.flatten(self.loc)
        scales = jax.tree.leaves(self.scale)
        weight_leaves = [1.0] * len(leaves) if weights is None else treedef.flatten_up_to(weights)
        keys = jax.random.split(key, len(leaves))
        draws, log_q = [], jnp.zeros(num_particles, jnp.float32)
        for loc, scale, weight, k in zip(leaves, scales, weight_leaves, keys, strict=True):
            eps = jax.random.normal(k, (num_particles, *loc.shape), loc.dtype)
            draws.append(loc + scale * eps)
            log_density = weight * (-0.5 * eps**2 - jnp.log(scale) - _HALF_LOG_2PI)
            log_q = log_q + jnp.sum(log_density.reshape(num_particles, -1), axis=1)
        return jax.tree.unflatten(treedef, draws), log_q

    def restrict(self, units: Int[Array, " slot"], unit_leaves: PyTree[bool]) -> MeanFieldNormal:
        """The batch's guide: unit leaves of ``loc`` and ``raw_scale`` taken at ``units``."""

        def take(x: Array, is_unit: bool) -> Array:  # noqa: FBT001
            return jnp.take(x, units, axis=-1) if is_unit else x

        return MeanFieldNormal(
            loc=jax.tree.map(take, self.loc, unit_leaves),
            raw_scale=jax.tree.map(take, self.raw_scale, unit_leaves),
        )

    def unit_update_mask(
        self, in_batch: Bool[Array, " unit"], unit_leaves: PyTree[bool]
    ) -> MeanFieldNormal:
        """``in_batch`` for unit leaves, ``True`` elsewhere, for ``loc`` and ``raw_scale``."""
        mask = jax.tree.map(lambda is_unit: in_batch if is_unit else _TRUE, unit_leaves)
        # a pytree shaped like the guide, of booleans (unflatten: not a valid guide)
        return jax.tree.unflatten(jax.tree.structure(self), jax.tree.leaves(mask) * 2)

    def log_prob(self, particles: PyTree[Float[Array, "..."]]) -> ParticleFloat:
        """Sum over latents of the normal log densities, one value per particle."""

        def leaf_log_prob(z: Array, loc: Array, scale: Array) -> Array:
            log_q = distrax.Normal(loc, scale).log_prob(z)
            return jnp.sum(log_q.reshape(z.shape[0], -1), axis=1)

        per_leaf = jax.tree.leaves(jax.tree.map(leaf_log_prob, particles, self.loc, self.scale))
        return sum(per_leaf[1:], per_leaf[0])

    def mean(self) -> PyTree[Float[Array, "..."]]:
        """The guide's mean (its ``loc``)."""
        return self.loc
