"""Hierarchical building blocks as Equinox modules.

A layer owns one block of latent variables. It is *non-centred*: the latent ``z`` is
standard normal a priori, and the layer maps it to the natural scale:

* :class:`Normal`: ``value = loc + scale * z`` (an effect with a fixed prior);
* :class:`Nested`: ``value = parent[index] + scale * z`` (an effect drawn around a parent
  effect, e.g. products around their category).

Layers are plain pytrees, usable inside any JAX/Equinox code::

    category = hbjax.vi.layers.Nested(scale=1.0, shape=(10,))
    product = hbjax.vi.layers.Nested(scale=2.0, index=product_to_category)
    beta_c = category(z_c, beta_g)        # [10]
    beta_i = product(z_i, beta_c)         # [n_products]
    log_p = category.log_prior(z_c) + product.log_prior(z_i)

How a nested value is parameterised is a module too: :class:`NonCentred` (the above) or
:class:`Centred` (latents on the values' own axis; :class:`AbstractHierarchy`).
"""

from __future__ import annotations

import abc
import math
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, Scalar

from .._types import float_dtype
from ._modes import from_name

#: ``log(2 pi) / 2``, the normal density's constant.
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def normal_log_prob(
    z: Float[ArrayLike, "..."], loc: Float[ArrayLike, "..."], scale: Float[ArrayLike, "..."]
) -> Float[Array, "..."]:
    """Elementwise ``log N(z | loc, scale)`` (arguments broadcast).

    ``-u^2 / 2 - log(scale) - log(2 pi) / 2`` with ``u = (z - loc) / scale``: one line, so
    the core needs no distribution library.
    """
    u = (z - loc) / scale
    return -0.5 * u * u - jnp.log(scale) - HALF_LOG_2PI


def standard_normal_log_prob(z: Float[ArrayLike, "*shape"]) -> Scalar:
    """Sum of standard-normal log densities of all entries of ``z``."""
    z = jnp.asarray(z)
    return jnp.sum(-0.5 * z * z) - z.size * HALF_LOG_2PI


class AbstractEffect(eqx.Module):
    """A block of non-centred latents with a standard-normal prior on ``z``.

    Subclasses define a static ``shape`` field: the shape of ``z``.
    """

    def latent_shape(self) -> jax.ShapeDtypeStruct:
        """Shape and dtype of ``z``, known before any data is seen."""
        return jax.ShapeDtypeStruct(self.shape, float_dtype())  # type: ignore[attr-defined]

    def log_prior(self, z: Float[ArrayLike, "*shape"]) -> Scalar:
        """Log density of ``z`` under its N(0, 1) prior."""
        return standard_normal_log_prob(z)

    def log_prior_terms(self, z: Float[ArrayLike, "*shape"]) -> Float[Array, "*shape"]:
        """Each entry's N(0, 1) log density (e.g. a model's per-unit prior terms)."""
        z = jnp.asarray(z)
        return -0.5 * z * z - HALF_LOG_2PI


class Normal(AbstractEffect):
    """An effect with prior ``N(loc, scale)``: ``value = loc + scale * z``.

    Attributes:
        loc: prior mean.
        scale: prior standard deviation.
        shape: shape of the effect, e.g. ``()`` or ``(n_units,)``.
    """

    loc: float
    scale: float
    shape: tuple[int, ...] = eqx.field(static=True, default=())

    def __call__(self, z: Float[ArrayLike, "*shape"]) -> Float[ArrayLike, "*shape"]:
        """Natural-scale value of the effect."""
        return self.loc + self.scale * z


class Nested(AbstractEffect):
    """An effect with prior ``N(parent[index], scale)``: ``value = parent[index] + scale * z``.

    Attributes:
        scale: prior standard deviation around the parent.
        index: parent of each element (``None``: the parent is broadcast, e.g. a scalar).
        shape: shape of the effect; taken from ``index`` when given.
    """

    scale: float
    index: Int[Array, " n"] | None
    shape: tuple[int, ...] = eqx.field(static=True)

    def __init__(
        self,
        scale: float,
        index: Int[Array | np.ndarray, " n"] | None = None,
        shape: tuple[int, ...] | None = None,
    ):
        self.scale = scale
        self.index = None if index is None else jnp.asarray(index, dtype=jnp.int32)
        if shape is None:
            if index is None:
                raise ValueError("Nested needs `index` or `shape` to know its size.")
            shape = tuple(self.index.shape)
        self.shape = tuple(shape)

    def __call__(
        self, z: Float[ArrayLike, "*shape"], parent: Float[ArrayLike, "*parent"]
    ) -> Float[ArrayLike, "*shape"]:
        """Natural-scale value given the parent's natural-scale value."""
        centre = parent if self.index is None else parent[self.index]
        return centre + self.scale * z


class AbstractHierarchy(eqx.Module):
    """How a nested effect's latent maps to its value: a parameterisation, not a prior.

    Either way the prior is ``value ~ N(parent, scale)``; ``loc`` is the prior mean of
    the hierarchy's top (where a centred latent's zero sits). ``name`` is what
    ``hierarchy=`` strings, ``--hierarchy`` and saved fits call it.
    """

    name: eqx.AbstractClassVar[str]

    @abc.abstractmethod
    def value(
        self, latent: ArrayLike, parent: ArrayLike, loc: ArrayLike, scale: ArrayLike
    ) -> ArrayLike:
        """The natural-scale value of ``latent``."""

    @abc.abstractmethod
    def latent(
        self, value: ArrayLike, parent: ArrayLike, loc: ArrayLike, scale: ArrayLike
    ) -> ArrayLike:
        """The latent of a natural-scale value (a starting point, say)."""

    def standardised(
        self, latent: ArrayLike, parent: ArrayLike, loc: ArrayLike, scale: ArrayLike
    ) -> ArrayLike:
        """``(value - parent) / scale``: standard normal a priori (unit Jacobian)."""
        return (self.value(latent, parent, loc, scale) - parent) / scale


class NonCentred(AbstractHierarchy):
    """``value = parent + scale * z``: the latent is the standardised deviation.

    The article's LocScaleReparam; best when the data say little about each value.
    """

    name: ClassVar[str] = "noncentred"

    def value(
        self, latent: ArrayLike, parent: ArrayLike, loc: ArrayLike, scale: ArrayLike
    ) -> ArrayLike:
        """``parent + scale * latent``."""
        del loc
        return parent + scale * latent

    def latent(
        self, value: ArrayLike, parent: ArrayLike, loc: ArrayLike, scale: ArrayLike
    ) -> ArrayLike:
        """``(value - parent) / scale``."""
        del loc
        return (jnp.asarray(value) - parent) / scale

    def standardised(
        self, latent: ArrayLike, parent: ArrayLike, loc: ArrayLike, scale: ArrayLike
    ) -> ArrayLike:
        """The latent itself."""
        del parent, loc, scale
        return latent


class Centred(AbstractHierarchy):
    """``value = loc + scale * v``: the latent is the value on its own (scaled) axis.

    With much data per value (a year of weekly sales per product) the posterior pins each
    value and leaves its parent loose; centred latents are then nearly independent a
    posteriori, where non-centred ones are strongly correlated (Betancourt & Girolami 2015).
    """

    name: ClassVar[str] = "centred"

    def value(
        self, latent: ArrayLike, parent: ArrayLike, loc: ArrayLike, scale: ArrayLike
    ) -> ArrayLike:
        """``loc + scale * latent``."""
        del parent
        return loc + scale * latent

    def latent(
        self, value: ArrayLike, parent: ArrayLike, loc: ArrayLike, scale: ArrayLike
    ) -> ArrayLike:
        """``(value - loc) / scale``."""
        del parent
        return (jnp.asarray(value) - loc) / scale


#: ``hierarchy=`` names of the parameterisations.
HIERARCHIES: dict[str, type[AbstractHierarchy]] = {"centred": Centred, "noncentred": NonCentred}


def as_hierarchy(hierarchy: str | AbstractHierarchy) -> AbstractHierarchy:
    """A parameterisation from itself or its name (:data:`HIERARCHIES`)."""
    return from_name(hierarchy, AbstractHierarchy, HIERARCHIES, "hierarchy")
