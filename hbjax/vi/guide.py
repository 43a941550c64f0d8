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
import functools
import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

from .._types import ParticleFloat, float_dtype
from .layers import HALF_LOG_2PI, normal_log_prob
from .model import ParentLink

_TRUE = np.True_


def inverse_softplus(x: Float[Array, "*s"]) -> Float[Array, "*s"]:
    """The ``raw`` value whose softplus is ``x`` (x > 0)."""
    x = jnp.asarray(x)
    return x + jnp.log(-jnp.expm1(-x))


def _starting_raw_scales(shapes: PyTree[jax.ShapeDtypeStruct], scale: float) -> PyTree:
    """``raw_scale`` leaves of the given shapes, each ``inverse_softplus(scale)``.

    Built on the host: one transfer per leaf, no small programs to compile.
    """
    if not scale > 0:
        raise ValueError(f"scale must be > 0; got {scale}.")
    raw = float(scale) + math.log(-math.expm1(-float(scale)))
    return jax.tree.map(lambda s: jnp.asarray(np.full(s.shape, raw, s.dtype)), shapes)


class AbstractGuide(eqx.Module):
    """Interface of a guide: draw particles and score them."""

    @abc.abstractmethod
    def sample(self, num_particles: int, *, key: PRNGKeyArray) -> PyTree[Float[Array, "..."]]:
        """Draw ``num_particles`` reparameterised particles (leading ``particle`` axis)."""

    @abc.abstractmethod
    def log_prob(
        self, particles: PyTree[Float[Array, "..."]], weights: PyTree | None = None
    ) -> ParticleFloat:
        """Log density under q of each particle (leading ``particle`` axis).

        ``weights``: as in :meth:`sample_and_log_prob` (guides that factorise over units).
        """

    def sample_and_log_prob(
        self, num_particles: int, *, key: PRNGKeyArray, weights: PyTree | None = None
    ) -> tuple[PyTree[Float[Array, "..."]], ParticleFloat]:
        """Particles and their log density; gradients flow through both (the total gradient).

        ``weights`` (minibatching: a pytree like the latents of scalars or ``[slot]``
        arrays) weights each latent's log-density term; only guides that factorise over
        latents (e.g. :class:`MeanFieldNormal`) support it.
        """
        particles = self.sample(num_particles, key=key)
        return particles, self.log_prob(particles, weights)


@eqx.filter_jit
def sample_once(guide: Any, num: int, key: PRNGKeyArray) -> PyTree[Float[Array, "..."]]:
    """``guide.sample(num, key=key)`` as one compiled program (any object with that method).

    For host code: called eagerly, each of a guide's operations compiles a program of its own.
    """
    return guide.sample(num, key=key)


class AbstractMinibatchGuide(AbstractGuide):
    """A guide that factorises over units, so a step can see a batch of units only.

    Minibatch fits (:class:`hbjax.Minibatches`) take only guides of this kind, checked
    before anything runs; a subclass that leaves out either method cannot be instantiated.
    """

    @abc.abstractmethod
    def restrict(
        self, units: Int[Array, " slot"], unit_leaves: PyTree[bool]
    ) -> AbstractMinibatchGuide:
        """The guide of a batch's latents: per-unit leaves taken at ``units``.

        Gradients flow back to the selected units' parameters only.
        """

    @abc.abstractmethod
    def unit_update_mask(self, in_batch: Bool[Array, " unit"], unit_leaves: PyTree[bool]) -> PyTree:
        """Booleans like the guide's parameters: which entries a batch step may update."""


def check_minibatch_guide(guide: AbstractGuide) -> None:
    """Raise a one-line ``TypeError`` unless ``guide`` can be minibatched."""
    if not isinstance(guide, AbstractMinibatchGuide):
        raise TypeError(
            f"{type(guide).__name__} is not an hbjax.AbstractMinibatchGuide (a guide that "
            "factorises over units): it cannot be minibatched; use UnitBlockNormal or "
            "MeanFieldNormal, or fit the full batch (hbjax.FullBatch)."
        )


class GaussianGuide(AbstractGuide):
    """A guide that is an affine map of standard normals: ``z = loc + L eps``.

    What it adds to :class:`AbstractGuide` lets hbjax report exact Gaussian summaries of
    quantities linear in the latents (:func:`hbjax.vi.convergence.gaussian_moments`) and
    measure convergence in posterior-sd units.
    """

    @abc.abstractmethod
    def mean(self) -> PyTree[Float[Array, "..."]]:
        """The guide's mean, shaped like the latents."""

    @abc.abstractmethod
    def marginal_scale(self) -> PyTree[Float[Array, "..."]]:
        """Each latent's marginal standard deviation, shaped like the latents."""

    @abc.abstractmethod
    def standard_shapes(self) -> PyTree[jax.ShapeDtypeStruct]:
        """Shapes of the standard normals ``eps`` that :meth:`from_standard` takes."""

    @abc.abstractmethod
    def from_standard(self, eps: PyTree[Float[Array, "..."]]) -> PyTree[Float[Array, "..."]]:
        """The latents ``loc + L eps`` of one set of standard normals (affine in ``eps``)."""

    def step_scales(self) -> PyTree[Float[Array, "..."]]:
        """Per parameter entry, the sd of the latent it moves (see :func:`scale_by_sd`).

        Shaped like ``eqx.filter(self, eqx.is_inexact_array)``: a mean's entries get the
        latent's current marginal sd, entries in absolute units of a latent (a Cholesky
        or low-rank factor's) that latent's sd, entries in relative units (log scales,
        coefficients in sds) ``inf``: no sd bounds their steps. This default is all
        ``inf``.
        """
        return jax.tree.map(
            lambda x: jnp.full_like(x, jnp.inf), eqx.filter(self, eqx.is_inexact_array)
        )


#: Standard-normal leaves up to this size are probed one entry at a time when an output
#: depends on several of their entries (e.g. a low-rank factor's columns, an effect's cells
#: mixed within their groups); larger ones fall back to Monte Carlo draws.
_PROBE_MAX = 1 << 14
#: One-hot probes evaluated at once when a leaf is probed entry by entry.
_PROBE_CHUNK = 128


def linear_moments(
    guide: GaussianGuide, fn: Callable[[PyTree], PyTree]
) -> tuple[PyTree[np.ndarray], PyTree[np.ndarray]] | None:
    """Exact mean and sd of ``fn(z)``, ``z ~ guide``, for ``fn`` affine in the latents (host).

    ``fn(loc + L eps) = fn(loc) + A eps``; the variance of output ``j`` is ``sum_k A_jk^2``.
    Per standard-normal leaf, when each output depends on at most one of its entries (a
    unit's own latents, its group's: checked with two random-sign probes against the
    all-ones probe), one evaluation gives that leaf's share exactly; other leaves of up to
    ``_PROBE_MAX`` entries are probed entry by entry, ``_PROBE_CHUNK`` one-hot probes at a
    time in one compiled loop that sums the squares. Returns ``None`` when neither applies
    (use Monte Carlo draws then).
    """
    shapes = jax.tree.leaves(guide.standard_shapes())
    treedef = jax.tree.structure(guide.standard_shapes())

    def linearised(guide: GaussianGuide) -> tuple[PyTree, Callable[[list[Array]], PyTree]]:
        """``fn`` at ``loc`` and ``eps -> A eps`` (one linear program for every probe)."""
        zeros = [jnp.zeros(s.shape, s.dtype) for s in shapes]
        at = lambda eps: fn(guide.from_standard(jax.tree.unflatten(treedef, eps)))  # noqa: E731
        return jax.linearize(at, zeros)

    def in_leaf(leaf: int, v: Array) -> list[Array]:
        """The probe ``v`` in leaf ``leaf``, zeros elsewhere."""
        return [v if i == leaf else jnp.zeros(s.shape, s.dtype) for i, s in enumerate(shapes)]

    @eqx.filter_jit
    def probes(guide: GaussianGuide, values: list[Array]) -> tuple[PyTree, list]:
        """``fn`` at ``loc`` and ``A v`` for each leaf's three probes ``v`` (one at a time)."""
        base, linear = linearised(guide)

        def one(index: Array) -> PyTree:
            leaf, which = index // 3, index % 3
            return linear([v[which] * (leaf == i).astype(v.dtype) for i, v in enumerate(values)])

        out = jax.lax.map(one, jnp.arange(3 * len(values)))
        return base, [jax.tree.map(lambda o: o[3 * i : 3 * i + 3], out) for i in range(len(values))]

    @eqx.filter_jit
    def squares(guide: GaussianGuide, leaf: int, size: int) -> PyTree:
        """``sum_k (A e_k)^2`` over the leaf's entries, a chunk of one-hot probes at a time."""
        shape = shapes[leaf]
        chunks = -(-size // _PROBE_CHUNK)
        _, linear = linearised(guide)

        def chunk(total: PyTree, c: Array) -> tuple[PyTree, None]:
            index = c * _PROBE_CHUNK + jnp.arange(_PROBE_CHUNK)
            hot = (index[:, None] == jnp.arange(size)[None, :]).astype(shape.dtype)
            out = jax.vmap(lambda v: linear(in_leaf(leaf, v.reshape(shape.shape))))(hot)
            return jax.tree.map(lambda t, o: t + jnp.sum(o * o, axis=0), total, out), None

        like = jax.eval_shape(lambda: linear(in_leaf(leaf, jnp.zeros(shape.shape, shape.dtype))))
        start = jax.tree.map(lambda o: jnp.zeros(o.shape, o.dtype), like)
        return jax.lax.scan(chunk, start, jnp.arange(chunks))[0]

    # every leaf at once: the all-ones probe and two random-sign probes
    # built on the host: each eager jnp op would compile a small program of its own
    first = [
        np.concatenate(
            [
                np.ones((1, *s.shape), s.dtype),
                np.random.default_rng(leaf).choice([-1.0, 1.0], (2, *s.shape)).astype(s.dtype),
            ]
        )
        for leaf, s in enumerate(shapes)
    ]
    mean, outs = jax.device_get(probes(guide, first))  # the checks below run on the host
    shares: list[PyTree] = []
    for leaf, (shape, out) in enumerate(zip(shapes, outs, strict=True)):
        ones, signed = jax.tree.map(lambda x: x[0], out), jax.tree.map(lambda x: x[1:], out)
        separable = all(
            np.allclose(np.abs(o)[None], np.abs(s), rtol=1e-4, atol=1e-6)
            for o, s in zip(jax.tree.leaves(ones), jax.tree.leaves(signed), strict=True)
        )
        size = math.prod(shape.shape)
        if separable:
            shares.append(jax.tree.map(np.square, ones))
        elif size <= _PROBE_MAX:
            shares.append(jax.device_get(squares(guide, leaf, size)))
        else:
            return None
    variance = functools.reduce(lambda a, b: jax.tree.map(np.add, a, b), shares)
    return mean, jax.tree.map(lambda v: np.asarray(np.sqrt(v)), variance)


class MeanFieldNormal(GaussianGuide, AbstractMinibatchGuide):
    """Independent normals over every latent: ``z ~ N(loc, softplus(raw_scale))``.

    Attributes:
        loc: pytree of means, the same structure as the model's latents.
        raw_scale: pytree of unconstrained scales (``scale = softplus(raw_scale)``).

    Example:
        >>> import jax, hbjax
        >>> sim = hbjax.simulate(n_units=20, n_periods=8, n_groups=2)
        >>> model = hbjax.counts.elasticity_data(sim.frame).model
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
        return cls(loc=_check_loc(shapes, loc), raw_scale=_starting_raw_scales(shapes, scale))

    @property
    def scale(self) -> PyTree[Float[Array, "..."]]:
        """Standard deviations, ``softplus(raw_scale)``."""
        return jax.tree.map(jax.nn.softplus, self.raw_scale)

    def sample(self, num_particles: int, *, key: PRNGKeyArray) -> PyTree[Float[Array, "..."]]:
        """``loc + scale * eps`` with ``eps ~ N(0, I)``."""
        leaves, treedef = jax.tree.flatten(self.loc)
        eps = _standard_normals(leaves, num_particles, key)
        scales = jax.tree.leaves(self.scale)
        draws = [loc + scale * e for loc, scale, e in zip(leaves, scales, eps, strict=True)]
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
        weight_leaves = _leaf_weights(treedef, weights)
        eps = _standard_normals(leaves, num_particles, key)
        draws = [loc + scale * e for loc, scale, e in zip(leaves, scales, eps, strict=True)]
        log_q = _standard_log_q(eps, scales, weight_leaves, num_particles)
        return jax.tree.unflatten(treedef, draws), log_q

    def restrict(self, units: Int[Array, " slot"], unit_leaves: PyTree[bool]) -> MeanFieldNormal:
        """The batch's guide: unit leaves of ``loc`` and ``raw_scale`` taken at ``units``."""
        return MeanFieldNormal(
            loc=_take_units(self.loc, units, unit_leaves),
            raw_scale=_take_units(self.raw_scale, units, unit_leaves),
        )

    def unit_update_mask(
        self, in_batch: Bool[Array, " unit"], unit_leaves: PyTree[bool]
    ) -> MeanFieldNormal:
        """``in_batch`` for unit leaves, ``True`` elsewhere, for ``loc`` and ``raw_scale``."""
        mask = jax.tree.map(lambda is_unit: in_batch if is_unit else _TRUE, unit_leaves)
        # a pytree shaped like the guide, of booleans (unflatten: not a valid guide)
        return jax.tree.unflatten(jax.tree.structure(self), jax.tree.leaves(mask) * 2)

    def log_prob(
        self, particles: PyTree[Float[Array, "..."]], weights: PyTree | None = None
    ) -> ParticleFloat:
        """Sum over latents of the (weighted) normal log densities, one value per particle."""
        leaves, treedef = jax.tree.flatten(self.loc)
        weight_leaves = _leaf_weights(treedef, weights)

        def leaf_log_prob(z: Array, loc: Array, scale: Array, weight: Array | float) -> Array:
            log_q = weight * normal_log_prob(z, loc, scale)
            return jnp.sum(log_q.reshape(z.shape[0], -1), axis=1)

        per_leaf = [
            leaf_log_prob(z, loc, scale, weight)
            for z, loc, scale, weight in zip(
                treedef.flatten_up_to(particles),
                leaves,
                jax.tree.leaves(self.scale),
                weight_leaves,
                strict=True,
            )
        ]
        return sum(per_leaf[1:], per_leaf[0])

    def mean(self) -> PyTree[Float[Array, "..."]]:
        """The guide's mean (its ``loc``)."""
        return self.loc

    def marginal_scale(self) -> PyTree[Float[Array, "..."]]:
        """The scales (the latents are independent)."""
        return self.scale

    def standard_shapes(self) -> PyTree[jax.ShapeDtypeStruct]:
        """One standard normal per latent."""
        return _shapes_of(self.loc)

    def from_standard(self, eps: PyTree[Float[Array, "..."]]) -> PyTree[Float[Array, "..."]]:
        """``loc + scale * eps``."""
        return jax.tree.map(lambda m, s, e: m + s * e, self.loc, self.scale, eps)

    def step_scales(self) -> PyTree[Float[Array, "..."]]:
        """The means' sds (:meth:`GaussianGuide.step_scales`)."""
        return _means_in_sds(self, super().step_scales())


def _means_in_sds(guide: GaussianGuide, scales: PyTree) -> PyTree:
    """``scales`` with ``guide.loc``'s entries at the latents' current marginal sds (constant).

    No gradient flows through a step's size (:meth:`GaussianGuide.step_scales`).
    """
    sds = jax.lax.stop_gradient(guide.marginal_scale())
    return eqx.tree_at(lambda g: g.loc, scales, sds)


def _shapes_of(tree: PyTree) -> PyTree[jax.ShapeDtypeStruct]:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), tree)


def _leaf_weights(treedef: Any, weights: PyTree | None) -> list:
    """Each latent leaf's log-density weight (1 without minibatch weights)."""
    if weights is None:
        return [1.0] * treedef.num_leaves
    return treedef.flatten_up_to(weights)


def _standard_normals(leaves: list[Array], num_particles: int, key: PRNGKeyArray) -> list[Array]:
    """``eps ~ N(0, I)`` shaped ``[particle, *leaf]`` for each leaf, cut from one draw.

    One ``jax.random.normal`` for every leaf: each call is a copy of the generator in the
    compiled program, and a guide of many leaves compiled several times slower.
    """
    if not leaves:
        return []
    sizes = [math.prod(leaf.shape) for leaf in leaves]
    flat = jax.random.normal(key, (num_particles, sum(sizes)), leaves[0].dtype)
    ends = np.cumsum(sizes)
    return [
        flat[:, end - size : end].reshape(num_particles, *leaf.shape)
        for leaf, size, end in zip(leaves, sizes, ends, strict=True)
    ]


def _take_units(tree: PyTree, units: Int[Array, " slot"], unit_leaves: PyTree[bool]) -> PyTree:
    """Unit leaves (unit axis last) taken at ``units``; other leaves as they are."""
    take = lambda x, is_unit: jnp.take(x, units, axis=-1) if is_unit else x  # noqa: E731
    return jax.tree.map(take, tree, unit_leaves)


def _check_loc(shapes: PyTree[jax.ShapeDtypeStruct], loc: PyTree | None) -> PyTree:
    """Starting means shaped like the latents (zeros by default)."""
    if loc is None:
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    expected = jax.tree.structure(shapes)
    if jax.tree.structure(loc) != expected:
        raise ValueError(f"loc has structure {jax.tree.structure(loc)}, expected {expected}.")
    return jax.tree.map(lambda s, x: jnp.asarray(x, s.dtype).reshape(s.shape), shapes, loc)


def _pairs(k: int) -> list[tuple[int, int]]:
    """Strictly-lower-triangular positions ``(row, column)`` of a k x k matrix, row-major."""
    return [(j, m) for j in range(k) for m in range(j)]


class UnitBlockNormal(GaussianGuide, AbstractMinibatchGuide):
    """Each unit's latents jointly normal (a full k x k covariance), independent across units.

    For a model whose :meth:`~hbjax.AbstractModel.unit_leaves` are ``k`` per-unit leaves
    (the elasticity model: a product's elasticity and intercept, ``k = 2``), unit ``i``'s
    latents are ``loc_i + L_i eps_i`` with ``L_i`` lower triangular: diagonal
    ``softplus(raw_scale)`` and strictly-lower entries ``unit_tril``. Shared latents are
    mean-field. Memory O(units * k^2); it factorises over units, so it minibatches.

    Attributes:
        loc: pytree of means, shaped like the model's latents.
        raw_scale: pytree of raw diagonal scales (``softplus`` on use).
        unit_tril: ``[k (k - 1) / 2, unit]`` strictly-lower Cholesky entries, in the order
            of :func:`_pairs` over the unit leaves (in the latents' flattening order).
        unit_leaf_ids: positions of the unit leaves among the flattened latents (static).

    Example:
        >>> import jax, hbjax
        >>> sim = hbjax.simulate(n_units=20, n_periods=8, n_groups=2)
        >>> model = hbjax.counts.elasticity_data(sim.frame).model
        >>> guide = hbjax.UnitBlockNormal.from_shapes(model.latent_shapes(), model.unit_leaves())
        >>> guide.unit_covariance().shape
        (20, 2, 2)
    """

    loc: PyTree[Float[Array, "..."]]
    raw_scale: PyTree[Float[Array, "..."]]
    unit_tril: Float[Array, "pair unit"]
    unit_leaf_ids: tuple[int, ...] = eqx.field(static=True)

    @classmethod
    def from_shapes(
        cls,
        shapes: PyTree[jax.ShapeDtypeStruct],
        unit_leaves: PyTree[bool],
        *,
        loc: PyTree | None = None,
        scale: float = 0.1,
    ) -> UnitBlockNormal:
        """A guide for the given latents, uncorrelated at the start.

        Args:
            shapes: the model's ``latent_shapes()``.
            unit_leaves: the model's ``unit_leaves()``: which leaves are per unit (each
                ``[unit]``, the same length).
            loc: starting means; zeros by default.
            scale: starting standard deviation of every latent.
        """
        if unit_leaves is None:
            raise ValueError(
                "UnitBlockNormal needs the model's unit_leaves() (which latents are per unit); "
                "this model declares none: use MeanFieldNormal or LowRankNormal."
            )
        flags = jax.tree.structure(shapes).flatten_up_to(unit_leaves)
        leaf_shapes = jax.tree.leaves(shapes)
        ids = tuple(i for i, flag in enumerate(flags) if flag)
        unit_shapes = {tuple(leaf_shapes[i].shape) for i in ids}
        if not ids or len(unit_shapes) != 1 or len(next(iter(unit_shapes))) != 1:
            raise ValueError(
                f"the unit leaves must be one or more [unit] arrays of one length; got shapes "
                f"{[leaf_shapes[i].shape for i in ids]}."
            )
        (n_units,) = next(iter(unit_shapes))
        return cls(
            loc=_check_loc(shapes, loc),
            raw_scale=_starting_raw_scales(shapes, scale),
            unit_tril=jnp.asarray(np.zeros((len(_pairs(len(ids))), n_units), float_dtype())),
            unit_leaf_ids=ids,
        )

    @property
    def scale(self) -> PyTree[Float[Array, "..."]]:
        """Diagonal of the Cholesky factors, ``softplus(raw_scale)``."""
        return jax.tree.map(jax.nn.softplus, self.raw_scale)

    def _mix(self, eps: list[Array], scales: list[Array]) -> list[Array]:
        """``L eps`` for every leaf: unit leaves mixed by the per-unit factors."""
        out = [scale * e for scale, e in zip(scales, eps, strict=True)]
        for p, (j, m) in enumerate(_pairs(len(self.unit_leaf_ids))):
            row, col = self.unit_leaf_ids[j], self.unit_leaf_ids[m]
            out[row] = out[row] + self.unit_tril[p] * eps[col]
        return out

    def sample_and_log_prob(
        self, num_particles: int, *, key: PRNGKeyArray, weights: PyTree | None = None
    ) -> tuple[PyTree[Float[Array, "..."]], ParticleFloat]:
        """Particles ``loc + L eps`` and ``log q = sum(-eps^2 / 2 - log diag(L)) - c``."""
        leaves, treedef = jax.tree.flatten(self.loc)
        scales = jax.tree.leaves(self.scale)
        weight_leaves = _leaf_weights(treedef, weights)
        eps = _standard_normals(leaves, num_particles, key)
        draws = [loc + x for loc, x in zip(leaves, self._mix(eps, scales), strict=True)]
        log_q = _standard_log_q(eps, scales, weight_leaves, num_particles)
        return jax.tree.unflatten(treedef, draws), log_q

    def sample(self, num_particles: int, *, key: PRNGKeyArray) -> PyTree[Float[Array, "..."]]:
        """``loc + L eps`` with ``eps ~ N(0, I)`` (the particles of sample_and_log_prob)."""
        return self.sample_and_log_prob(num_particles, key=key)[0]

    def log_prob(
        self, particles: PyTree[Float[Array, "..."]], weights: PyTree | None = None
    ) -> ParticleFloat:
        """Log density: ``eps = L^-1 (z - loc)`` by forward substitution per unit."""
        leaves, treedef = jax.tree.flatten(self.loc)
        scales = jax.tree.leaves(self.scale)
        weight_leaves = _leaf_weights(treedef, weights)
        residual = [
            z - loc for z, loc in zip(treedef.flatten_up_to(particles), leaves, strict=True)
        ]
        eps = [r / scale for r, scale in zip(residual, scales, strict=True)]
        pairs = _pairs(len(self.unit_leaf_ids))
        for j, leaf in enumerate(self.unit_leaf_ids):  # rows in order: earlier eps are final
            mixed = sum(
                (
                    self.unit_tril[p] * eps[self.unit_leaf_ids[m]]
                    for p, (r, m) in enumerate(pairs)
                    if r == j
                ),
                jnp.zeros_like(residual[leaf]),
            )
            eps[leaf] = (residual[leaf] - mixed) / scales[leaf]
        return _standard_log_q(eps, scales, weight_leaves, residual[0].shape[0])

    def unit_covariance(self) -> Float[Array, "unit k k"]:
        """Each unit's k x k covariance ``L_i L_i^T`` of its latents (unit-leaf order)."""
        k = len(self.unit_leaf_ids)
        scales = jax.tree.leaves(self.scale)
        n_units = scales[self.unit_leaf_ids[0]].shape[-1]
        chol = jnp.zeros((n_units, k, k), float_dtype())
        for j, leaf in enumerate(self.unit_leaf_ids):
            chol = chol.at[:, j, j].set(scales[leaf])
        for p, (j, m) in enumerate(_pairs(k)):
            chol = chol.at[:, j, m].set(self.unit_tril[p])
        return chol @ jnp.swapaxes(chol, -1, -2)

    def restrict(self, units: Int[Array, " slot"], unit_leaves: PyTree[bool]) -> UnitBlockNormal:
        """The batch's guide: unit leaves and ``unit_tril`` taken at ``units``."""
        return UnitBlockNormal(
            loc=_take_units(self.loc, units, unit_leaves),
            raw_scale=_take_units(self.raw_scale, units, unit_leaves),
            unit_tril=jnp.take(self.unit_tril, units, axis=-1),
            unit_leaf_ids=self.unit_leaf_ids,
        )

    def unit_update_mask(
        self, in_batch: Bool[Array, " unit"], unit_leaves: PyTree[bool]
    ) -> UnitBlockNormal:
        """``in_batch`` for the unit leaves and ``unit_tril``; ``True`` elsewhere."""
        mask = jax.tree.leaves(
            jax.tree.map(lambda is_unit: in_batch if is_unit else _TRUE, unit_leaves)
        )
        leaves = [*mask, *mask, in_batch]  # loc, raw_scale, unit_tril (broadcast over pairs)
        return jax.tree.unflatten(jax.tree.structure(self), leaves)

    def mean(self) -> PyTree[Float[Array, "..."]]:
        """The guide's mean (its ``loc``)."""
        return self.loc

    def marginal_scale(self) -> PyTree[Float[Array, "..."]]:
        """Square roots of the diagonal of ``L L^T`` (unit leaves add their factors' rows)."""
        variances = [s**2 for s in jax.tree.leaves(self.scale)]
        for p, (j, _) in enumerate(_pairs(len(self.unit_leaf_ids))):
            row = self.unit_leaf_ids[j]
            variances[row] = variances[row] + self.unit_tril[p] ** 2
        return jax.tree.unflatten(jax.tree.structure(self.loc), [jnp.sqrt(v) for v in variances])

    def standard_shapes(self) -> PyTree[jax.ShapeDtypeStruct]:
        """One standard normal per latent."""
        return _shapes_of(self.loc)

    def from_standard(self, eps: PyTree[Float[Array, "..."]]) -> PyTree[Float[Array, "..."]]:
        """``loc + L eps``."""
        leaves, treedef = jax.tree.flatten(self.loc)
        mixed = self._mix(treedef.flatten_up_to(eps), jax.tree.leaves(self.scale))
        return jax.tree.unflatten(treedef, [m + x for m, x in zip(leaves, mixed, strict=True)])

    def step_scales(self) -> PyTree[Float[Array, "..."]]:
        """The means' sds, and ``unit_tril``'s rows' (its entries are absolute)."""
        scales = _means_in_sds(self, super().step_scales())
        sds = jax.tree.leaves(scales.loc)
        rows = [sds[self.unit_leaf_ids[j]] for j, _ in _pairs(len(self.unit_leaf_ids))]
        rows = jnp.stack(rows) if rows else jnp.full_like(self.unit_tril, jnp.inf)
        return eqx.tree_at(lambda g: g.unit_tril, scales, rows)


def _standard_log_q(
    eps: list[Array], scales: list[Array], weights: list[Array | float], num_particles: int
) -> ParticleFloat:
    """``sum(weight * (-eps^2 / 2 - log scale - log(2 pi) / 2))`` per particle."""
    log_q = jnp.zeros(num_particles, float_dtype())
    for e, scale, weight in zip(eps, scales, weights, strict=True):
        log_density = weight * (-0.5 * e**2 - jnp.log(scale) - HALF_LOG_2PI)
        log_q = log_q + jnp.sum(log_density.reshape(num_particles, -1), axis=1)
    return log_q


class LowRankNormal(GaussianGuide):
    """A normal over all latents with covariance ``diag(d^2) + W W^T`` (rank ``r`` factor).

    ``z = loc + d * eps + W eta`` with ``eps ~ N(0, I_n)``, ``eta ~ N(0, I_r)`` over the
    ``n`` latents flattened in pytree order. The log density uses the Woodbury identity
    and the matrix determinant lemma: O(n r^2) time, O(n r) memory. It couples all units,
    so it does not minibatch.

    Attributes:
        loc: pytree of means, shaped like the model's latents.
        raw_scale: pytree of raw diagonal scales (``d = softplus(raw_scale)``).
        factor: ``[latent, rank]`` the factor ``W``.
    """

    loc: PyTree[Float[Array, "..."]]
    raw_scale: PyTree[Float[Array, "..."]]
    factor: Float[Array, "latent rank"]

    @classmethod
    def from_shapes(
        cls,
        shapes: PyTree[jax.ShapeDtypeStruct],
        *,
        rank: int = 8,
        key: PRNGKeyArray,
        loc: PyTree | None = None,
        scale: float = 0.1,
        factor_scale: float = 1e-3,
    ) -> LowRankNormal:
        """A guide for the given latents with a small random factor (W = 0 is a saddle).

        Args:
            shapes: the model's ``latent_shapes()``.
            rank: columns of the factor.
            key: PRNG key for the factor's start.
            loc: starting means; zeros by default.
            scale: starting diagonal standard deviation.
            factor_scale: standard deviation of the factor's random start.
        """
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int; got {rank!r}.")
        n = sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))
        return cls(
            loc=_check_loc(shapes, loc),
            raw_scale=_starting_raw_scales(shapes, scale),
            factor=factor_scale * jax.random.normal(key, (n, rank), float_dtype()),
        )

    def _flat(self, tree: PyTree) -> Float[Array, "*p latent"]:
        """Leaves concatenated along a last ``latent`` axis (leading axes kept)."""
        leaves, treedef = jax.tree.flatten(self.loc)
        values = treedef.flatten_up_to(tree)
        lead = values[0].shape[: values[0].ndim - leaves[0].ndim]
        return jnp.concatenate([v.reshape(*lead, -1) for v in values], axis=-1)

    def _unflat(self, flat: Float[Array, "p latent"]) -> PyTree:
        leaves, treedef = jax.tree.flatten(self.loc)
        sizes = np.cumsum([leaf.size for leaf in leaves])[:-1]
        parts = jnp.split(flat, sizes, axis=-1)
        return jax.tree.unflatten(
            treedef,
            [p.reshape(flat.shape[0], *leaf.shape) for p, leaf in zip(parts, leaves, strict=True)],
        )

    def _log_q(self, x: Float[Array, "p latent"]) -> ParticleFloat:
        """Log density of deviations ``x = z - loc`` (Woodbury, determinant lemma)."""
        d = self._flat(jax.tree.map(jax.nn.softplus, self.raw_scale))
        w = self.factor / d[:, None]  # D^-1 W
        capacitance = jnp.eye(w.shape[1], dtype=w.dtype) + w.T @ w
        chol = jnp.linalg.cholesky(capacitance)
        y = x / d  # D^-1 x
        v = jax.scipy.linalg.solve_triangular(chol, (y @ w).T, lower=True)  # [rank, p]
        quad = jnp.sum(y**2, axis=-1) - jnp.sum(v**2, axis=0)
        log_det = 2 * jnp.sum(jnp.log(d)) + 2 * jnp.sum(jnp.log(jnp.diag(chol)))
        return -0.5 * (quad + log_det) - x.shape[-1] * HALF_LOG_2PI

    def sample_and_log_prob(
        self, num_particles: int, *, key: PRNGKeyArray, weights: PyTree | None = None
    ) -> tuple[PyTree[Float[Array, "..."]], ParticleFloat]:
        """Particles ``loc + d eps + W eta`` and their log density (total gradient)."""
        if weights is not None:
            raise TypeError(
                "LowRankNormal couples all units and cannot be minibatched; use "
                "UnitBlockNormal or MeanFieldNormal with batch_size."
            )
        d = self._flat(jax.tree.map(jax.nn.softplus, self.raw_scale))
        eps, eta = _standard_normals([d, self.factor[0]], num_particles, key)
        x = d * eps + eta @ self.factor.T
        particles = self._unflat(self._flat(self.loc)[None] + x)
        return particles, self._log_q(x)

    def sample(self, num_particles: int, *, key: PRNGKeyArray) -> PyTree[Float[Array, "..."]]:
        """``loc + d eps + W eta`` (the particles of sample_and_log_prob)."""
        return self.sample_and_log_prob(num_particles, key=key)[0]

    def log_prob(
        self, particles: PyTree[Float[Array, "..."]], weights: PyTree | None = None
    ) -> ParticleFloat:
        """Log density of each particle."""
        if weights is not None:
            raise TypeError("LowRankNormal cannot be minibatched (no weights).")
        return self._log_q(self._flat(particles) - self._flat(self.loc)[None])

    def covariance(self) -> Float[Array, "latent latent"]:
        """The dense covariance ``diag(d^2) + W W^T`` (for small models and tests)."""
        d = self._flat(jax.tree.map(jax.nn.softplus, self.raw_scale))
        return jnp.diag(d**2) + self.factor @ self.factor.T

    def marginal_scale(self) -> PyTree[Float[Array, "..."]]:
        """Each latent's marginal standard deviation, shaped like the latents."""
        d = self._flat(jax.tree.map(jax.nn.softplus, self.raw_scale))
        sd = jnp.sqrt(d**2 + jnp.sum(self.factor**2, axis=1))
        return jax.tree.map(lambda x: x[0], self._unflat(sd[None]))

    def mean(self) -> PyTree[Float[Array, "..."]]:
        """The guide's mean (its ``loc``)."""
        return self.loc

    def standard_shapes(self) -> PyTree[jax.ShapeDtypeStruct]:
        """``(eps, eta)``: one standard normal per latent (shaped like them) and per column."""
        rank = self.factor.shape[1]
        return (_shapes_of(self.loc), jax.ShapeDtypeStruct((rank,), self.factor.dtype))

    def from_standard(self, eps: PyTree[Float[Array, "..."]]) -> PyTree[Float[Array, "..."]]:
        """``loc + d eps + W eta``."""
        per_latent, eta = eps
        d = self._flat(jax.tree.map(jax.nn.softplus, self.raw_scale))
        x = self._flat(self.loc) + d * self._flat(per_latent) + self.factor @ eta
        return jax.tree.map(lambda leaf: leaf[0], self._unflat(x[None]))

    def step_scales(self) -> PyTree[Float[Array, "..."]]:
        """The means' sds, and each factor row's latent's (its entries are absolute)."""
        scales = _means_in_sds(self, super().step_scales())
        rows = jnp.broadcast_to(self._flat(scales.loc)[:, None], self.factor.shape)
        return eqx.tree_at(lambda g: g.factor, scales, rows)


class DependentNormal(GaussianGuide, AbstractMinibatchGuide):
    """A guide whose children follow their parents' draws: a hierarchy's dependence.

    Over a ``base`` guide (:class:`MeanFieldNormal` or :class:`UnitBlockNormal`), each
    :class:`~hbjax.vi.model.ParentLink` of the model moves the child's draw by a learned
    multiple of its parent's deviation from the parent's mean, parents first::

        z_child = base_child + coef * s_child / s_parent[i] * (z_parent[i] - mean_parent[i])

    with ``i`` the link's ``index`` and ``s`` the base's sds (so ``coef`` is in sds, like a
    correlation). A hierarchy's children are independent given their parent a
    posteriori, so with a Gaussian posterior this family holds the exact one; a guide
    without ``coef`` gives a parent only its spread *given* its children, too narrow where
    a group has few of them or they are poorly known. The map is unit-triangular: ``log
    q`` is the base's at the unmoved draw and the mean is the base's; O(entries) per link,
    one ``coef`` per child entry, so a unit's coefficients minibatch with it (a unit cannot
    be a parent). ``coef`` starts at 0 (the base guide).

    Attributes:
        base: the guide of the unmoved draws.
        coef: per link, ``[*child]`` the child's coefficients on its parent, in base sds.
        links: the model's :meth:`~hbjax.AbstractModel.parent_links`.

    Example:
        >>> import hbjax
        >>> data = hbjax.counts.elasticity_data(hbjax.simulate(n_units=20, n_periods=8).frame)
        >>> guide = hbjax.make_guide("unitblock", data.model, dependent=True)
        >>> type(guide).__name__, len(guide.links)
        ('DependentNormal', 3)
    """

    base: MeanFieldNormal | UnitBlockNormal
    coef: tuple[Float[Array, "..."], ...]
    links: tuple[ParentLink, ...]

    def __init__(
        self,
        base: MeanFieldNormal | UnitBlockNormal,
        links: tuple[ParentLink, ...],
        coef: tuple[Float[Array, "..."], ...] | None = None,
    ):
        """``base`` moved along ``links`` (each child after its parent's own link)."""
        shapes = [s.shape for s in jax.tree.leaves(base.standard_shapes())]
        children = [link.child for link in links]
        for k, link in enumerate(links):
            index = () if link.index is None else tuple(link.index.shape)
            parent = shapes[link.parent][:-1] if index else shapes[link.parent]
            if (index and index != shapes[link.child]) or parent != ():
                raise ValueError(
                    f"link {link.parent} -> {link.child}: the index must be shaped like the "
                    f"child {shapes[link.child]} into a vector parent, or None under a scalar "
                    f"parent; got index {index or None} and parent {shapes[link.parent]}."
                )
            if link.parent in children[k:]:
                raise ValueError(
                    f"link {link.parent} -> {link.child} comes before the parent's own link "
                    "(or is a loop): order the links parents first."
                )
        self.base, self.links = base, tuple(links)
        if coef is None:
            coef = tuple(jnp.zeros(shapes[link.child], float_dtype()) for link in links)
        self.coef = tuple(coef)

    @staticmethod
    def _under(parent: Array, link: ParentLink, ndim: int) -> Array:
        """``parent`` at each entry of the child (``ndim`` axes), particles leading or not."""
        if link.index is None:
            return parent.reshape(parent.shape + (1,) * ndim)
        return jnp.take(parent, link.index, axis=-1)

    def _slopes(self) -> list[Array]:
        """Per link, ``coef * s_child / s_parent`` (base sds): the child's move per parent unit.

        ``coef`` is in sds, so Adam's steps are the same size relative to every child: on
        raw slopes a step of a precise child's slope on a vague parent moves it by many of
        its sds, and the fit shrinks the parent to stop it (category sds 0.06x NUTS's).
        """
        scales = jax.tree.leaves(self.base.marginal_scale())
        return [
            coef * scales[link.child] / self._under(scales[link.parent], link, coef.ndim)
            for link, coef in zip(self.links, self.coef, strict=True)
        ]

    def _moved(self, tree: PyTree, sign: float) -> PyTree:
        """The base's draws moved along the links; ``sign`` -1: back, from the final draws."""
        final, treedef = jax.tree.flatten(tree)
        mean = jax.tree.leaves(self.base.mean())
        out = list(final)  # forward, a parent is final before its children move
        for link, slope in zip(self.links, self._slopes(), strict=True):
            parent = (out if sign > 0 else final)[link.parent] - mean[link.parent]
            out[link.child] = out[link.child] + sign * slope * self._under(parent, link, slope.ndim)
        return jax.tree.unflatten(treedef, out)

    def sample_and_log_prob(
        self, num_particles: int, *, key: PRNGKeyArray, weights: PyTree | None = None
    ) -> tuple[PyTree[Float[Array, "..."]], ParticleFloat]:
        """The base's particles moved along the links; ``log q`` the base's (unit Jacobian)."""
        draws, log_q = self.base.sample_and_log_prob(num_particles, key=key, weights=weights)
        return self._moved(draws, 1.0), log_q

    def sample(self, num_particles: int, *, key: PRNGKeyArray) -> PyTree[Float[Array, "..."]]:
        """The base's particles moved along the links."""
        return self._moved(self.base.sample(num_particles, key=key), 1.0)

    def log_prob(
        self, particles: PyTree[Float[Array, "..."]], weights: PyTree | None = None
    ) -> ParticleFloat:
        """The base's log density of the unmoved particles."""
        return self.base.log_prob(self._moved(particles, -1.0), weights)

    def mean(self) -> PyTree[Float[Array, "..."]]:
        """The base's mean (each move has mean zero)."""
        return self.base.mean()

    def marginal_scale(self) -> PyTree[Float[Array, "..."]]:
        """``sqrt(var_base + coef^2 var_parent[index])``, parents first.

        Exact where the base draws a link's child independently of its parent (the base
        guides couple a unit's own leaves only, and a unit is no parent).
        """
        scales, treedef = jax.tree.flatten(self.base.marginal_scale())
        variance = [s * s for s in scales]
        for link, slope in zip(self.links, self._slopes(), strict=True):
            under = self._under(variance[link.parent], link, slope.ndim)
            variance[link.child] = variance[link.child] + slope * slope * under
        return jax.tree.unflatten(treedef, [jnp.sqrt(v) for v in variance])

    def standard_shapes(self) -> PyTree[jax.ShapeDtypeStruct]:
        """The base's."""
        return self.base.standard_shapes()

    def from_standard(self, eps: PyTree[Float[Array, "..."]]) -> PyTree[Float[Array, "..."]]:
        """The base's latents of ``eps`` moved along the links."""
        return self._moved(self.base.from_standard(eps), 1.0)

    def step_scales(self) -> PyTree[Float[Array, "..."]]:
        """The base's; ``inf`` for ``coef`` (in sds already)."""
        return eqx.tree_at(lambda g: g.base, super().step_scales(), self.base.step_scales())

    def _unit_links(self, unit_leaves: PyTree[bool]) -> list[bool]:
        """Whether each link's child is a unit leaf (a unit parent: one-line ValueError)."""
        flags = jax.tree.structure(self.base.mean()).flatten_up_to(unit_leaves)
        for link in self.links:
            if flags[link.parent]:
                raise ValueError(f"a unit leaf ({link.parent}) cannot be a parent to minibatch.")
        return [bool(flags[link.child]) for link in self.links]

    def restrict(self, units: Int[Array, " slot"], unit_leaves: PyTree[bool]) -> DependentNormal:
        """The batch's guide: the base restricted, unit children's links taken at ``units``."""
        is_unit = self._unit_links(unit_leaves)
        links = tuple(
            ParentLink(link.child, link.parent, jnp.take(link.index, units, axis=-1))
            if unit and link.index is not None
            else link
            for link, unit in zip(self.links, is_unit, strict=True)
        )
        coef = tuple(
            jnp.take(c, units, axis=-1) if unit else c
            for c, unit in zip(self.coef, is_unit, strict=True)
        )
        return DependentNormal(self.base.restrict(units, unit_leaves), links, coef)

    def unit_update_mask(
        self, in_batch: Bool[Array, " unit"], unit_leaves: PyTree[bool]
    ) -> DependentNormal:
        """The base's mask; ``in_batch`` for unit children's ``coef``, ``True`` elsewhere."""
        is_unit = self._unit_links(unit_leaves)
        mask = jax.tree.map(lambda _: _TRUE, eqx.filter(self, eqx.is_inexact_array))
        mask = eqx.tree_at(
            lambda m: m.base, mask, self.base.unit_update_mask(in_batch, unit_leaves)
        )
        coef = tuple(in_batch if unit else _TRUE for unit in is_unit)
        return eqx.tree_at(lambda m: m.coef, mask, coef)


class ComposedGuide(GaussianGuide, AbstractMinibatchGuide):
    """A guide made of parts, each a Gaussian guide over its own latent leaves.

    NumPyro's ``AutoGuideList`` as one Equinox module: ``parts[name]`` is a guide built
    over the latents ``owns[name]`` selects (the latent pytree with ``None`` at the other
    leaves, as :func:`equinox.filter` leaves it), e.g. a :class:`LowRankNormal` of full rank
    over the shared latents and a :class:`UnitBlockNormal` over the units. The parts are
    independent: draws and means are the parts' combined, ``log q`` their sum. A minibatch
    restricts the parts that own unit leaves (each must be an
    :class:`AbstractMinibatchGuide`). :func:`part_labels` gives ``optax.multi_transform``
    each part's parameters, for a learning rate per part.

    Attributes:
        parts: per name, a Gaussian guide over that part's latents.
        owns: per name, whether it owns each latent leaf (in the latents' flattening order).
    """

    parts: dict[str, GaussianGuide]
    owns: tuple[tuple[str, tuple[bool, ...]], ...] = eqx.field(static=True)

    def __init__(self, parts: dict[str, GaussianGuide], owns: dict[str, PyTree[bool]]):
        """``parts`` over the leaves ``owns`` selects; each leaf owned by exactly one part.

        ``owns``: per part, booleans shaped like the latents (or their flattened tuple).
        """
        if set(parts) != set(owns):
            raise ValueError(f"parts {sorted(parts)} and owns {sorted(owns)} name other parts.")
        flags = {k: tuple(bool(f) for f in jax.tree.leaves(owns[k])) for k in parts}
        counts = np.sum(np.asarray(list(flags.values()), np.int64), axis=0)
        if len({len(f) for f in flags.values()}) != 1 or not np.all(counts == 1):
            raise ValueError(
                "every latent leaf must be owned by exactly one part; owners per leaf: "
                f"{np.atleast_1d(counts).tolist()}."
            )
        self.parts, self.owns = dict(parts), tuple(flags.items())

    def _mask(self, name: str, tree: PyTree) -> PyTree[bool]:
        """Part ``name``'s leaves of a latent-shaped ``tree``."""
        return jax.tree.unflatten(jax.tree.structure(tree), dict(self.owns)[name])

    def _split(self, tree: PyTree) -> dict[str, PyTree]:
        """Each part's share of a latent-shaped tree (particles leading or not)."""
        return {k: eqx.filter(tree, self._mask(k, tree)) for k in self.parts}

    def _joined(self, shares: dict[str, PyTree]) -> PyTree:
        return eqx.combine(*shares.values())

    def sample_and_log_prob(
        self, num_particles: int, *, key: PRNGKeyArray, weights: PyTree | None = None
    ) -> tuple[PyTree[Float[Array, "..."]], ParticleFloat]:
        """Each part's particles (its own key) combined; ``log q`` the parts' sum."""
        # by sorted name: a dict rebuilt from the pytree (after jit) is in sorted order
        names = sorted(self.parts)
        keys = dict(zip(names, jax.random.split(key, len(names)), strict=True))
        shares = self._split(weights) if weights is not None else dict.fromkeys(self.parts)
        drawn = {
            k: part.sample_and_log_prob(num_particles, key=keys[k], weights=shares[k])
            for k, part in self.parts.items()
        }
        log_q = sum(log_q for _, log_q in drawn.values())
        return self._joined({k: z for k, (z, _) in drawn.items()}), log_q

    def sample(self, num_particles: int, *, key: PRNGKeyArray) -> PyTree[Float[Array, "..."]]:
        """Each part's particles combined."""
        return self.sample_and_log_prob(num_particles, key=key)[0]

    def log_prob(
        self, particles: PyTree[Float[Array, "..."]], weights: PyTree | None = None
    ) -> ParticleFloat:
        """The parts' log densities of their own latents, summed."""
        shares = self._split(particles)
        weight = self._split(weights) if weights is not None else dict.fromkeys(self.parts)
        return sum(part.log_prob(shares[k], weight[k]) for k, part in self.parts.items())

    def mean(self) -> PyTree[Float[Array, "..."]]:
        """The parts' means combined."""
        return self._joined({k: part.mean() for k, part in self.parts.items()})

    def marginal_scale(self) -> PyTree[Float[Array, "..."]]:
        """The parts' marginal sds combined."""
        return self._joined({k: part.marginal_scale() for k, part in self.parts.items()})

    def standard_shapes(self) -> dict[str, PyTree[jax.ShapeDtypeStruct]]:
        """Per part, its standard normals."""
        return {k: part.standard_shapes() for k, part in self.parts.items()}

    def from_standard(self, eps: dict[str, PyTree]) -> PyTree[Float[Array, "..."]]:
        """Each part's latents of its standard normals, combined."""
        return self._joined({k: part.from_standard(eps[k]) for k, part in self.parts.items()})

    def step_scales(self) -> PyTree[Float[Array, "..."]]:
        """Each part's."""
        parts = {k: part.step_scales() for k, part in self.parts.items()}
        return eqx.tree_at(lambda g: g.parts, super().step_scales(), parts)

    def _unit_parts(self, unit_leaves: PyTree[bool]) -> dict[str, PyTree[bool] | None]:
        """Each part's unit leaves (``None``: it owns none); a unit owner must minibatch."""
        out: dict[str, PyTree[bool] | None] = {}
        for k, part in self.parts.items():
            owned = self._mask(k, unit_leaves)
            mine = eqx.filter(unit_leaves, owned)
            out[k] = mine if any(jax.tree.leaves(mine)) else None
            if out[k] is not None and not isinstance(part, AbstractMinibatchGuide):
                raise TypeError(
                    f"part {k!r} ({type(part).__name__}) owns unit latents but cannot be "
                    "minibatched; give the units a UnitBlockNormal or MeanFieldNormal part."
                )
        return out

    def restrict(self, units: Int[Array, " slot"], unit_leaves: PyTree[bool]) -> ComposedGuide:
        """The batch's guide: the parts that own unit latents restricted."""
        owners = self._unit_parts(unit_leaves)
        parts = {
            k: part if owners[k] is None else part.restrict(units, owners[k])  # type: ignore[attr-defined]
            for k, part in self.parts.items()
        }
        return eqx.tree_at(lambda g: g.parts, self, parts)

    def unit_update_mask(
        self, in_batch: Bool[Array, " unit"], unit_leaves: PyTree[bool]
    ) -> ComposedGuide:
        """Each unit-owning part's mask; ``True`` for the other parts' parameters."""
        owners = self._unit_parts(unit_leaves)
        parts = {
            k: jax.tree.map(lambda _: _TRUE, eqx.filter(part, eqx.is_inexact_array))
            if owners[k] is None
            else part.unit_update_mask(in_batch, owners[k])  # type: ignore[attr-defined]
            for k, part in self.parts.items()
        }
        return eqx.tree_at(lambda g: g.parts, self, parts)


def part_labels(guide: ComposedGuide) -> PyTree[str]:
    """Each parameter's part name, shaped like the guide's parameters.

    ``optax.multi_transform``'s labels, for a learning rate per part::

        rates = {"shared": optax.adam(5e-4), "units": optax.adam(1e-2)}
        optimizer = optax.multi_transform(rates, hbjax.vi.guide.part_labels(guide))
    """
    parts = {
        k: jax.tree.map(lambda _, k=k: k, eqx.filter(part, eqx.is_inexact_array))
        for k, part in guide.parts.items()
    }
    return eqx.tree_at(lambda g: g.parts, eqx.filter(guide, eqx.is_inexact_array), parts)


#: Guide names for :func:`make_guide` and ``hbjax fit --guide``.
GUIDES: dict[str, type[GaussianGuide]] = {
    "meanfield": MeanFieldNormal,
    "unitblock": UnitBlockNormal,
    "lowrank": LowRankNormal,
}


def make_guide(
    kind: str | type[GaussianGuide],
    model: eqx.Module,
    *,
    loc: PyTree | None = None,
    key: PRNGKeyArray | None = None,
    rank: int = 8,
    scale: float = 0.1,
    dependent: bool = False,
) -> AbstractGuide:
    """A guide for ``model``: ``MeanFieldNormal``, ``UnitBlockNormal`` or ``LowRankNormal``.

    Args:
        kind: the class, or its name in :data:`GUIDES` (``"meanfield"``, ``"unitblock"``,
            ``"lowrank"``).
        model: the model (an :class:`hbjax.AbstractModel`).
        loc: starting means (e.g. ``model.init_latents(panel)``).
        key: PRNG key (``"lowrank"`` only: the factor's random start); default key 0.
        rank: the factor's rank (``"lowrank"``).
        scale: starting standard deviation.
        dependent: the mean-field or unit-block guide in a :class:`DependentNormal` over
            the model's :meth:`~hbjax.AbstractModel.parent_links` (the guide itself when
            it has none).
    """
    cls = GUIDES.get(kind) if isinstance(kind, str) else kind
    shapes = model.latent_shapes()
    if dependent and cls is LowRankNormal:
        raise ValueError("dependent=True moves a meanfield or unitblock guide, not lowrank.")
    base: MeanFieldNormal | UnitBlockNormal | None = None
    if cls is MeanFieldNormal:
        base = MeanFieldNormal.from_shapes(shapes, loc=loc, scale=scale)
    if cls is UnitBlockNormal:
        base = UnitBlockNormal.from_shapes(shapes, model.unit_leaves(), loc=loc, scale=scale)
    if base is not None:
        links = model.parent_links() if dependent else ()
        return DependentNormal(base, links) if links else base
    if cls is LowRankNormal:
        key = jax.random.key(0) if key is None else key
        return LowRankNormal.from_shapes(shapes, rank=rank, key=key, loc=loc, scale=scale)
    raise ValueError(f"unknown guide {kind!r}; choose one of {', '.join(GUIDES)}.")
