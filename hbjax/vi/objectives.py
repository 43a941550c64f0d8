r"""Variational objectives, written out so they can be read and replaced.

With K particles :math:`z_k \sim q` and log importance weights
:math:`\log w_k = \log p(x, z_k) - \log q(z_k)`, the Rényi-α bound (Li & Turner, 2016) is

.. math::

    \mathcal{L}_\alpha = \frac{1}{1-\alpha}
        \log \frac{1}{K} \sum_{k=1}^K w_k^{\,1-\alpha},

* ``alpha = 0``: the importance-weighted bound (IWAE, Burda et al. 2016); it is at least the
  ELBO and tightens as K grows;
* ``alpha -> 1``: the ELBO, :math:`\frac{1}{K}\sum_k \log w_k` (taken exactly at ``alpha == 1``
  and computed stably near it);
* ``K = 1``: the ELBO for every alpha.

Every objective returns a **loss to minimise**: the negative bound. An objective is any
function ``(model, guide, panel, *, key) -> loss``; pass your own to :func:`hbjax.fit`.
:class:`RenyiBound` is this bound as an Equinox module, its options checked when built.
An :class:`AbstractObjective` is also given the step, so its options may follow a
schedule (optax-style: a function of the step count), e.g. alpha from 1 (the ELBO) to 0::

    RenyiBound(alpha=optax.linear_schedule(1.0, 0.0, 2000), schedule_end=2000)

:func:`hbjax.fit` starts averaging, and so its convergence check, no earlier than the
step where the schedule ends (:attr:`AbstractObjective.settled_at`).

**Gradient estimators** (``gradient=``: an :class:`AbstractGradient` module or its name)
change where ``stop_gradient`` goes, never the loss's value:

* ``"total"``: the plain reparameterised gradient of the bound;
* ``"stl"`` (stick the landing, Roeder et al. 2017; the ELBO, ``alpha = 1`` or K = 1):
  ``log q`` is evaluated with the guide's parameters held fixed, dropping the score term
  whose expectation is zero; its variance vanishes as q approaches the posterior. For an
  importance-weighted bound that term does not vanish in expectation (STL is biased there:
  refused);
* ``"dreg"`` (doubly reparameterised, Tucker et al. 2019; ``alpha = 0`` only): the
  importance-weighted gradient ``sum_k w~_k^2 d log w_k / dz_k dz_k/dphi`` with
  normalised weights ``w~``, unbiased for the guide's parameters (the only ones
  :func:`hbjax.fit` trains) and with a signal-to-noise ratio that does not decay in K.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._types import Int, ParticleFloat, PRNGKeyArray, PyTree, Scalar
from ._modes import from_name
from .guide import AbstractGuide, check_minibatch_guide
from .model import AbstractModel, AbstractUnitBatch, AbstractUnitModel

#: An option's value at a step (optax-style, e.g. ``optax.linear_schedule(1.0, 0.0, 2000)``).
Schedule = Callable[[Int[jax.Array, ""]], Scalar]

#: How particles go through the model (:func:`map_particles`).
PARTICLE_MAPS = ("auto", "sequential", "vectorized")


def _check_particle_map(how: str) -> None:
    if how not in PARTICLE_MAPS:
        raise ValueError(f"particle_map must be one of {', '.join(PARTICLE_MAPS)}; got {how!r}.")


def map_particles(
    fn: Callable[[PyTree], Scalar], particles: PyTree, how: str = "auto"
) -> ParticleFloat:
    """``fn`` of each particle (leading ``particle`` axis), one after another or all at once.

    ``"sequential"`` (``lax.map``): each pass streams the data once and keeps one
    particle's intermediates; on CPU several times faster than ``vmap`` over large data,
    with K times less memory. ``"vectorized"`` (``vmap``): every kernel sees all K
    particles, K times fewer kernel launches and loop iterations: the GPU shape.
    ``"auto"``: sequential on CPU, vectorized on GPU and TPU (the default backend's).
    Both give the same values and gradients (tested).
    """
    _check_particle_map(how)
    if how == "auto":
        how = "sequential" if jax.default_backend() == "cpu" else "vectorized"
    if how == "vectorized":
        return jax.vmap(fn)(particles)
    return jax.lax.map(fn, particles)


def log_weights(
    model: AbstractModel,
    guide: AbstractGuide,
    panel: PyTree,
    *,
    key: PRNGKeyArray,
    num_particles: int,
    stop_score: bool = False,
    particle_map: str = "auto",
) -> ParticleFloat:
    """``log p(panel, z_k) - log q(z_k)`` for ``num_particles`` draws ``z_k ~ q``.

    ``stop_score``: evaluate ``log q`` with the guide's parameters held fixed (gradients
    reach them only through the particles): stick-the-landing and DReG.
    ``particle_map``: how the particles go through the model (:func:`map_particles`).
    """
    if isinstance(panel, AbstractUnitBatch):  # a minibatch: unbiased estimates of the full weights
        return batch_log_weights(
            model,
            guide,
            panel,
            key=key,
            num_particles=num_particles,
            stop_score=stop_score,
            particle_map=particle_map,
        )
    particles, log_q = _draw(guide, num_particles, key=key, stop_score=stop_score)
    log_p = map_particles(lambda z: model.log_joint(z, panel), particles, particle_map)
    return log_p - log_q


def _draw(
    guide: AbstractGuide,
    num_particles: int,
    *,
    key: PRNGKeyArray,
    stop_score: bool,
    weights: PyTree | None = None,
) -> tuple[PyTree, ParticleFloat]:
    """Particles and ``log q``; with ``stop_score`` the density's parameters are frozen."""
    if not stop_score:
        return guide.sample_and_log_prob(num_particles, key=key, weights=weights)
    particles = guide.sample(num_particles, key=key)
    return particles, jax.lax.stop_gradient(guide).log_prob(particles, weights)


def batch_log_weights(
    model: AbstractModel,
    guide: AbstractGuide,
    batch: AbstractUnitBatch,
    *,
    key: PRNGKeyArray,
    num_particles: int,
    stop_score: bool = False,
    particle_map: str = "auto",
) -> ParticleFloat:
    """Log weights estimated from a batch of units (each particle's, unbiasedly).

    Only the batch's unit latents are drawn (``guide.restrict``); their ``log q`` and
    ``log p`` terms carry the slot weights, shared latents weight 1. For a guide that
    factorises over units (mean-field) the expectation over batches of each particle's
    log weight is its full-data log weight; the ELBO (``alpha = 1``) is then unbiased,
    while a bound with ``alpha < 1`` takes a log-mean-exp of estimates and is not.
    """
    if not isinstance(model, AbstractUnitModel):
        raise TypeError(
            f"{type(model).__name__} is not an hbjax.AbstractUnitModel: it cannot be minibatched."
        )
    check_minibatch_guide(guide)
    unit_leaves = model.unit_leaves()
    weights = jax.tree.map(lambda is_unit: batch.weight if is_unit else 1.0, unit_leaves)
    local = guide.restrict(batch.unit, unit_leaves)
    particles, log_q = _draw(local, num_particles, key=key, stop_score=stop_score, weights=weights)
    log_p = map_particles(lambda z: model.batch_log_joint(z, batch), particles, particle_map)
    return log_p - log_q


class AbstractGradient(eqx.Module):
    """A gradient estimator of the Rényi bound: where ``stop_gradient`` goes, never the value.

    Subclasses say whether ``log q`` is scored with the guide's parameters frozen
    (``stop_score``), give the loss whose gradient is the estimator (:meth:`loss`), and
    refuse the bounds they are biased for (:meth:`check`, run when a :class:`RenyiBound`
    is built). A subclass sets ``stop_score: ClassVar[bool] = ...`` and defines ``loss``.
    """

    stop_score: eqx.AbstractClassVar[bool]

    @abc.abstractmethod
    def loss(self, log_w: ParticleFloat, alpha: float | Scalar) -> Scalar:
        """The negative bound from log weights, differentiated as this estimator."""

    def check(self, alpha: float | None, num_particles: int) -> None:
        """Raise ``ValueError`` if the estimator is biased for this bound (default: never).

        ``alpha`` is ``None`` where it is an array or a schedule (not one number).
        """


class TotalGradient(AbstractGradient):
    """The plain reparameterised gradient of the bound (score term included)."""

    stop_score: ClassVar[bool] = False

    def loss(self, log_w: ParticleFloat, alpha: float | Scalar) -> Scalar:
        """``-renyi_bound(log_w, alpha)``."""
        return -renyi_bound(log_w, alpha)


class StickingTheLanding(AbstractGradient):
    """Stick the landing (Roeder et al. 2017): the score term dropped; the ELBO only."""

    stop_score: ClassVar[bool] = True

    def loss(self, log_w: ParticleFloat, alpha: float | Scalar) -> Scalar:
        """``-renyi_bound(log_w, alpha)`` of stop-score log weights."""
        return -renyi_bound(log_w, alpha)

    def check(self, alpha: float | None, num_particles: int) -> None:
        """Biased for an importance-weighted bound: the ELBO (alpha 1) or 1 particle only."""
        if alpha != 1.0 and num_particles > 1:
            raise ValueError(
                f"the stick-the-landing gradient is biased for an importance-weighted bound "
                f"(alpha = {alpha}, {num_particles} particles); use gradient='dreg' with "
                "alpha = 0, or 'stl' with the ELBO (alpha = 1)."
            )


class DReG(AbstractGradient):
    """Doubly reparameterised (Tucker et al. 2019): the importance-weighted bound only."""

    stop_score: ClassVar[bool] = True

    def loss(self, log_w: ParticleFloat, alpha: float | Scalar) -> Scalar:
        """``-dreg_surrogate(log_w)``."""
        return -dreg_surrogate(log_w)

    def check(self, alpha: float | None, num_particles: int) -> None:
        """Derived for alpha 0 only."""
        if alpha != 0.0:
            got = "an array or a schedule" if alpha is None else alpha
            raise ValueError(
                f"the DReG gradient ('dreg') is derived for the importance-weighted bound "
                f"(alpha = 0); got alpha = {got}. Use gradient 'total' (or 'stl' for the "
                "ELBO) for other alphas."
            )


#: Gradient estimators by name (``gradient=`` and ``--gradient``; see the module docstring).
GRADIENTS: dict[str, type[AbstractGradient]] = {
    "total": TotalGradient,
    "stl": StickingTheLanding,
    "dreg": DReG,
}


def as_gradient(gradient: str | AbstractGradient) -> AbstractGradient:
    """A gradient estimator from itself or its name (:data:`GRADIENTS`)."""
    return from_name(gradient, AbstractGradient, GRADIENTS, "gradient")


class AbstractObjective(eqx.Module):
    """A loss to minimise that is told the step: its options may follow schedules.

    ``objective(model, guide, batch, *, key, step)``: :class:`hbjax.SVI` (and so
    :func:`hbjax.fit`) passes the steps done so far (a traced int32); ``step=None`` asks
    for the options' final values. A plain function ``(model, guide, batch, *, key)``
    remains an objective too, never told the step.
    """

    @abc.abstractmethod
    def __call__(
        self,
        model: AbstractModel,
        guide: AbstractGuide,
        batch: PyTree,
        *,
        key: PRNGKeyArray,
        step: Int[jax.Array, ""] | int | None = None,
    ) -> Scalar:
        """The loss at ``step``."""

    @property
    def settled_at(self) -> int:
        """The first step from which the objective no longer changes (0: it never does)."""
        return 0


def _as_alpha(alpha: object) -> object:
    """A number as a Python float; an array or a schedule as it is."""
    if callable(alpha) or isinstance(alpha, jax.Array):
        return alpha
    return float(alpha)


class RenyiBound(AbstractObjective):
    """The negative Rényi-α bound as an objective, its options checked once when built.

    ``RenyiBound(alpha, num_particles, gradient)(model, guide, panel, key=key)`` is the loss
    :func:`hbjax.fit` minimises (pass the module as ``objective=``).

    Attributes:
        alpha: the Rényi order; 0 is importance weighted (the article's choice), 1 the ELBO.
            A number, an array (e.g. traced: vmap a loss over alphas) or a schedule, a
            function of the step (then ``gradient="total"`` and ``schedule_end`` given).
        num_particles: K, the number of particles.
        gradient: an :class:`AbstractGradient` or its name, ``"total"``, ``"stl"`` or
            ``"dreg"`` (``alpha = 0`` only); the loss's value is the same for all three.
        particle_map: ``"auto"``, ``"sequential"`` or ``"vectorized"``
            (:func:`map_particles`); the same loss and gradient, a different speed.
        schedule_end: with a scheduled ``alpha``, the step from which it stays at its last
            value (:attr:`settled_at`); 0 otherwise.

    Example:
        >>> import hbjax
        >>> objective = hbjax.RenyiBound(alpha=0.0, num_particles=8, gradient="dreg")
        >>> # hbjax.fit(model, guide, panel, key=key, steps=1000, objective=objective)
    """

    alpha: float | jax.Array | Schedule = eqx.field(default=0.0, converter=_as_alpha)
    num_particles: int = eqx.field(static=True, default=4)
    gradient: AbstractGradient = eqx.field(static=True, default="total", converter=as_gradient)
    particle_map: str = eqx.field(static=True, default="auto")
    schedule_end: int = eqx.field(static=True, default=0)

    def __check_init__(self) -> None:
        n = self.num_particles
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
            raise ValueError(f"num_particles must be an integer >= 1; got {n!r}.")
        _check_particle_map(self.particle_map)
        scheduled = callable(self.alpha)
        end = self.schedule_end
        if isinstance(end, bool) or not isinstance(end, int | np.integer) or end < 0:
            raise ValueError(f"schedule_end must be an integer >= 0; got {end!r}.")
        if scheduled and end < 1:
            raise ValueError(
                "a scheduled alpha needs schedule_end, the step from which it stays at its "
                "last value (e.g. RenyiBound(alpha=optax.linear_schedule(1.0, 0.0, 2000), "
                "schedule_end=2000)): fit averages and checks convergence only after it."
            )
        if end and not scheduled:
            raise ValueError(
                f"schedule_end={end} needs a scheduled alpha (a function of the step)."
            )
        self.gradient.check(self.alpha if isinstance(self.alpha, float) else None, n)

    @property
    def settled_at(self) -> int:
        """``schedule_end``: where a scheduled alpha stops changing (0: a fixed alpha)."""
        return int(self.schedule_end)

    def alpha_at(self, step: Int[jax.Array, ""] | int | None) -> float | jax.Array:
        """Alpha at ``step`` (a schedule's last value for ``None``)."""
        if not callable(self.alpha):
            return self.alpha
        return self.alpha(self.schedule_end if step is None else step)

    def __repr__(self) -> str:
        """As Equinox prints it; a schedule by its values at 0 and where it ends."""
        if not callable(self.alpha):
            return super().__repr__()
        ends = f"{float(self.alpha(0)):g} -> {float(self.alpha(self.schedule_end)):g}"
        return (
            f"RenyiBound(alpha=schedule({ends} at step {self.schedule_end}), num_particles="
            f"{self.num_particles}, gradient={self.gradient!r}, particle_map="
            f"{self.particle_map!r})"
        )

    def __call__(
        self,
        model: AbstractModel,
        guide: AbstractGuide,
        panel: PyTree,
        *,
        key: PRNGKeyArray,
        step: Int[jax.Array, ""] | int | None = None,
    ) -> Scalar:
        """The loss at ``step``: minus the bound, differentiated as :attr:`gradient` says."""
        log_w = log_weights(
            model,
            guide,
            panel,
            key=key,
            num_particles=self.num_particles,
            stop_score=self.gradient.stop_score,
            particle_map=self.particle_map,
        )
        return self.gradient.loss(log_w, self.alpha_at(step))


def renyi_bound(log_w: ParticleFloat, alpha: float | Scalar) -> Scalar:
    r"""The Rényi-α bound from log weights (see the module docstring).

    Computed as :math:`m + \log(1 + \overline{\mathrm{expm1}(s(\log w - m))}) / s` with
    :math:`s = 1-\alpha` and :math:`m` the max (min for :math:`s<0`) log weight, which is exact,
    overflow-free and stable as :math:`\alpha \to 1`; at ``alpha == 1`` the mean log weight.
    ``alpha`` may be traced (a schedule's value).
    """
    s = 1.0 - alpha
    safe = jnp.where(s == 0, 1.0, s)  # the other branch must stay finite: where's gradient
    m = jax.lax.stop_gradient(jnp.where(safe > 0, jnp.max(log_w), jnp.min(log_w)))
    scaled = safe * (log_w - m)  # <= 0
    bound = m + jnp.log1p(jnp.mean(jnp.expm1(scaled))) / safe
    return jnp.where(s == 0, jnp.mean(log_w), bound)


def renyi_elbo(
    model: AbstractModel,
    guide: AbstractGuide,
    panel: PyTree,
    *,
    key: PRNGKeyArray,
    alpha: float = 0.0,
    num_particles: int = 4,
    gradient: str | AbstractGradient = "total",
    particle_map: str = "auto",
) -> Scalar:
    """Negative Rényi-α bound with ``num_particles`` particles (a loss to minimise).

    The function form of :class:`RenyiBound` (the same arguments, see there).

    Example:
        >>> import functools
        >>> from hbjax.vi.objectives import renyi_elbo
        >>> objective = functools.partial(renyi_elbo, alpha=0.5, num_particles=8)
        >>> # hbjax.fit(model, guide, panel, key=key, steps=1000, objective=objective)
    """
    bound = RenyiBound(alpha, num_particles, gradient, particle_map)
    return bound(model, guide, panel, key=key)


#: :func:`hbjax.fit`'s objective (see :func:`default_objective`).
DEFAULT_BOUND = RenyiBound(alpha=0.0, num_particles=4, gradient=DReG())


def default_objective(
    model: AbstractModel, guide: AbstractGuide, panel: PyTree, *, key: PRNGKeyArray
) -> Scalar:
    """:func:`hbjax.fit`'s objective: the article's bound (alpha 0, 4 particles), DReG gradient.

    The same bound and optimum as the total gradient, with a gradient of lower variance
    (zero at the exact posterior): the iterates jitter less, so averaging reaches its
    Monte Carlo target in fewer steps (10k x 156 panel: 1,300 steps instead of 5,300, the
    same answer; benchmarks/README.md, "Converged fits").
    """
    return DEFAULT_BOUND(model, guide, panel, key=key)


def dreg_surrogate(log_w: ParticleFloat) -> Scalar:
    r"""The IW bound's value with the DReG gradient, from stop-score log weights.

    Value :math:`\log \frac1K \sum_k w_k`; gradient :math:`\sum_k \tilde w_k^2\,
    \nabla \log w_k` with :math:`\tilde w = \mathrm{softmax}(\log w)` held fixed, which
    with ``log q`` evaluated at frozen parameters is the doubly-reparameterised gradient.
    """
    weights = jax.lax.stop_gradient(jax.nn.softmax(log_w))
    surrogate = jnp.sum(weights**2 * log_w)
    value = renyi_bound(jax.lax.stop_gradient(log_w), 0.0)
    return value + surrogate - jax.lax.stop_gradient(surrogate)


def elbo(
    model: AbstractModel,
    guide: AbstractGuide,
    panel: PyTree,
    *,
    key: PRNGKeyArray,
    num_particles: int = 1,
    gradient: str | AbstractGradient = "total",
) -> Scalar:
    """Negative ELBO, ``-mean_k log w_k`` (a loss to minimise); ``gradient``: total or stl."""
    return renyi_elbo(
        model, guide, panel, key=key, alpha=1.0, num_particles=num_particles, gradient=gradient
    )
