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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._types import ParticleFloat, PRNGKeyArray, PyTree, Scalar
from .guide import AbstractGuide
from .minibatch import UnitBatch
from .model import AbstractModel


def log_weights(
    model: AbstractModel,
    guide: AbstractGuide,
    panel: PyTree,
    *,
    key: PRNGKeyArray,
    num_particles: int,
) -> ParticleFloat:
    """``log p(panel, z_k) - log q(z_k)`` for ``num_particles`` draws ``z_k ~ q``.

    The particles go through the model one after the other (``lax.map``): each pass
    streams the data once and keeps one particle's intermediates, which on CPU is several
    times faster than ``vmap`` over large data and needs K times less memory.
    """
    if isinstance(panel, UnitBatch):  # a minibatch: unbiased estimates of the full weights
        return batch_log_weights(model, guide, panel, key=key, num_particles=num_particles)
    particles, log_q = guide.sample_and_log_prob(num_particles, key=key)
    log_p = jax.lax.map(lambda z: model.log_joint(z, panel), particles)
    return log_p - log_q


def batch_log_weights(
    model: AbstractModel,
    guide: AbstractGuide,
    batch: UnitBatch,
    *,
    key: PRNGKeyArray,
    num_particles: int,
) -> ParticleFloat:
    """Log weights estimated from a batch of units (each particle's, unbiasedly).

    Only the batch's unit latents are drawn (``guide.restrict``); their ``log q`` and
    ``log p`` terms carry the slot weights, shared latents weight 1. For a guide that
    factorises over units (mean-field) the expectation over batches of each particle's
    log weight is its full-data log weight; the ELBO (``alpha = 1``) is then unbiased,
    while a bound with ``alpha < 1`` takes a log-mean-exp of estimates and is not.
    """
    unit_leaves = model.unit_leaves()
    if unit_leaves is None:
        raise TypeError(
            f"{type(model).__name__} does not declare unit_leaves(): it cannot be minibatched."
        )
    weights = jax.tree.map(lambda is_unit: batch.weight if is_unit else 1.0, unit_leaves)
    local = guide.restrict(batch.unit, unit_leaves)
    particles, log_q = local.sample_and_log_prob(num_particles, key=key, weights=weights)
    log_p = jax.lax.map(lambda z: model.batch_log_joint(z, batch), particles)
    return log_p - log_q


def renyi_bound(log_w: ParticleFloat, alpha: float) -> Scalar:
    r"""The Rényi-α bound from log weights (see the module docstring).

    Computed as :math:`m + \log(1 + \overline{\mathrm{expm1}(s(\log w - m))}) / s` with
    :math:`s = 1-\alpha` and :math:`m` the max (min for :math:`s<0`) log weight, which is exact,
    overflow-free and stable as :math:`\alpha \to 1`.
    """
    if alpha == 1.0:
        return jnp.mean(log_w)
    s = 1.0 - alpha
    m = jax.lax.stop_gradient(jnp.max(log_w) if s > 0 else jnp.min(log_w))
    scaled = s * (log_w - m)  # <= 0
    return m + jnp.log1p(jnp.mean(jnp.expm1(scaled))) / s


def renyi_elbo(
    model: AbstractModel,
    guide: AbstractGuide,
    panel: PyTree,
    *,
    key: PRNGKeyArray,
    alpha: float = 0.0,
    num_particles: int = 4,
) -> Scalar:
    """Negative Rényi-α bound with ``num_particles`` particles (a loss to minimise).

    Args:
        model: the model (prior and likelihood).
        guide: the variational family.
        panel: the data.
        key: PRNG key for the particles.
        alpha: the Rényi order; 0 is importance weighted (the article's choice), 1 the ELBO.
        num_particles: K, the number of particles.

    Example:
        >>> import functools, hbjax
        >>> objective = functools.partial(hbjax.renyi_elbo, alpha=0.5, num_particles=8)
        >>> # hbjax.fit(model, guide, panel, key=key, steps=1000, objective=objective)
    """
    if num_particles < 1:
        raise ValueError(f"num_particles must be >= 1; got {num_particles}.")
    log_w = log_weights(model, guide, panel, key=key, num_particles=num_particles)
    return -renyi_bound(log_w, alpha)


def elbo(
    model: AbstractModel,
    guide: AbstractGuide,
    panel: PyTree,
    *,
    key: PRNGKeyArray,
    num_particles: int = 1,
) -> Scalar:
    """Negative ELBO, ``-mean_k log w_k`` (a loss to minimise)."""
    return renyi_elbo(model, guide, panel, key=key, alpha=1.0, num_particles=num_particles)
