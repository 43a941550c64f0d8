"""Count likelihoods of the rate kernels: Poisson and negative binomial.

A likelihood here is an Equinox module that knows the log-probability of a count given the
log of its mean, ``log_rate``, and its own global parameter (none for the Poisson; the log
dispersion for the negative binomial), with the prior of that parameter's latent. The
kernels (:mod:`hbjax.counts.regression`, :mod:`hbjax.counts.grid`) compute the log-rate of every row
and call :meth:`AbstractCountLikelihood.log_kernel`; the ``log y!`` term, a constant of the
data, is added by the kernels (precomputed where they can).

Write your own by subclassing :class:`AbstractCountLikelihood`: ``log_kernel`` must be
elementwise in its arrays (the kernels differentiate it per row).
"""

from __future__ import annotations

import abc
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import gammaln

from .._types import AnyArray, Array, Float, Scalar, float_dtype
from ..vi.layers import Normal


class AbstractCountLikelihood(eqx.Module):
    """A count distribution with mean ``exp(log_rate)`` and at most one global parameter.

    Attributes (of subclasses): the prior layer of the parameter's latent, if any.
    """

    #: the name used by the CLI, ``FitConfig`` and saved fits
    name: eqx.AbstractClassVar[str]

    @abc.abstractmethod
    def latent_shape(self) -> jax.ShapeDtypeStruct | None:
        """Shape of the parameter's latent; ``None``: no parameter."""

    @abc.abstractmethod
    def log_prior(self, z: Float[Array, ""] | None) -> Scalar:
        """Log prior density of the parameter's latent (0 without one)."""

    @abc.abstractmethod
    def parameter(self, z: Float[Array, "*p"] | None) -> Float[Array, "*p"] | None:
        """The kernel's parameter from the latent (``None`` without one)."""

    @abc.abstractmethod
    def natural(self, z: Float[Array, "*p"] | None) -> Float[Array, "*p"] | None:
        """The reported value of the parameter (``None`` without one)."""

    @abc.abstractmethod
    def starting_scale(self, n_obs: int) -> float | None:
        """A guide's starting sd for the parameter's latent (``None``: no parameter)."""

    @abc.abstractmethod
    def information(self, counts: Float[np.ndarray, " row"]) -> Float[np.ndarray, " row"]:
        """Each row's Fisher information about its log rate, at a mean equal to its count.

        For a guide's starting scales (host arrays; a rough, data-only guess).
        """

    @abc.abstractmethod
    def sample(
        self, rng: np.random.Generator, mean: np.ndarray, parameter: float | np.ndarray | None
    ) -> np.ndarray:
        """Counts drawn with the given means (host, for predictive checks).

        ``parameter``: one value, or one per count.
        """

    @abc.abstractmethod
    def log_kernel(
        self, log_rate: Float[Array, "*n"], counts: Float[AnyArray, "*n"], parameter: Array | None
    ) -> Float[Array, "*n"]:
        """``log p(counts | exp(log_rate), parameter) + log(counts!)``, elementwise."""


class Poisson(AbstractCountLikelihood):
    """``y ~ Poisson(exp(log_rate))``: variance equal to the mean (the article's)."""

    name: ClassVar[str] = "poisson"

    def latent_shape(self) -> None:
        """No parameter."""
        return None

    def log_prior(self, z: None) -> Scalar:
        """0: no parameter."""
        del z
        return jnp.zeros((), float_dtype())

    def parameter(self, z: None) -> None:
        """No parameter."""
        del z

    def natural(self, z: None) -> None:
        """No parameter."""
        del z

    def information(self, counts: Float[np.ndarray, " row"]) -> Float[np.ndarray, " row"]:
        """``mu``: the Poisson's information about ``log mu``."""
        return np.asarray(counts, np.float64)

    def starting_scale(self, n_obs: int) -> None:
        """No parameter."""
        del n_obs

    def sample(
        self, rng: np.random.Generator, mean: np.ndarray, parameter: float | None = None
    ) -> np.ndarray:
        """Poisson counts."""
        del parameter
        return rng.poisson(mean)

    def log_kernel(
        self,
        log_rate: Float[Array, "*n"],
        counts: Float[AnyArray, "*n"],
        parameter: Array | None = None,
    ) -> Float[Array, "*n"]:
        """``y log_rate - exp(log_rate)`` (``parameter`` is ignored)."""
        del parameter
        return counts * log_rate - jnp.exp(log_rate)


class NegativeBinomial(AbstractCountLikelihood):
    """``y ~ NegBin(mean mu = exp(log_rate), dispersion phi)``: variance ``mu + phi mu^2``.

    One global dispersion ``phi``, with ``log phi ~ N(loc, scale)`` (default ``N(-2, 2)``:
    from nearly Poisson, ``phi ~ 0.005``, to strongly overdispersed, ``phi ~ 4``, within its
    central 95%). ``phi -> 0`` is the Poisson. The reported value is ``phi``.

    The log-probability with ``r = 1/phi``: ``log Gamma(y + r) - log Gamma(r)
    - r softplus(log mu - log r) - y softplus(log r - log mu)`` (the softplus forms of
    ``r log(r / (r + mu))`` and ``y log(mu / (r + mu))`` stay exact for any ``r``). The
    difference of log-gammas is float32's: exact to about ``1e-7 log Gamma(y + r)`` per
    row, which matters only for nearly Poisson counts (``phi < 1e-3``), where it adds
    ~0.01 nats of rounding per row. (An exact log-beta costs 6x more per row.)

    Attributes:
        log_dispersion: the prior layer of ``log phi``.
    """

    name: ClassVar[str] = "negbin"
    log_dispersion: Normal

    def __init__(self, log_dispersion_prior: tuple[float, float] = (-2.0, 2.0)):
        """The likelihood with ``log phi ~ N(*log_dispersion_prior)`` (mean, sd)."""
        loc, scale = (float(v) for v in log_dispersion_prior)
        if not scale > 0:
            raise ValueError(f"the prior sd of log phi must be > 0; got {scale}.")
        self.log_dispersion = Normal(loc, scale, ())

    def latent_shape(self) -> jax.ShapeDtypeStruct:
        """A scalar: the standard-normal ``z`` of ``log phi``."""
        return self.log_dispersion.latent_shape()

    def log_prior(self, z: Float[Array, ""]) -> Scalar:
        """Standard-normal log density of ``z``."""
        return self.log_dispersion.log_prior(z)

    def starting_scale(self, n_obs: int) -> float:
        """A guide's starting sd for the latent: about its posterior sd with ``n_obs`` rows.

        The information about ``log phi`` is about 0.1 per row for counts of tens and
        ``phi`` near 1/3 (less for smaller counts), so its posterior sd is about
        ``3 / sqrt(n_obs)`` (``/ scale`` for the latent). A guide started at the usual 0.1
        spends thousands of steps shrinking it.
        """
        return 3.0 / (self.log_dispersion.scale * max(n_obs, 1) ** 0.5)

    def information(self, counts: Float[np.ndarray, " row"]) -> Float[np.ndarray, " row"]:
        """``mu / (1 + phi mu)`` at the prior's centre ``phi``."""
        mu = np.asarray(counts, np.float64)
        return mu / (1.0 + np.exp(self.log_dispersion.loc) * mu)

    def parameter(self, z: Float[Array, "*p"]) -> Float[Array, "*p"]:
        """``log phi``."""
        return self.log_dispersion(z)

    def natural(self, z: Float[Array, "*p"]) -> Float[Array, "*p"]:
        """``phi``."""
        return jnp.exp(self.log_dispersion(z))

    def sample(
        self, rng: np.random.Generator, mean: np.ndarray, parameter: float | np.ndarray
    ) -> np.ndarray:
        """Gamma-Poisson counts (``parameter = log phi``: one, or one per count)."""
        r = np.exp(-np.asarray(parameter, np.float64))
        return rng.poisson(rng.gamma(r, np.asarray(mean) / r))

    def log_kernel(
        self, log_rate: Float[Array, "*n"], counts: Float[AnyArray, "*n"], parameter: Array
    ) -> Float[Array, "*n"]:
        """The negative-binomial log-probability plus ``log y!`` (``parameter = log phi``)."""
        log_r = -parameter  # r = 1 / phi
        r = jnp.exp(log_r)
        return (
            gammaln(counts + r)
            - gammaln(r)
            - r * jax.nn.softplus(log_rate - log_r)
            - counts * jax.nn.softplus(log_r - log_rate)
        )


#: The likelihoods by name (the CLI's ``--likelihood``).
LIKELIHOODS: dict[str, type[AbstractCountLikelihood]] = {
    "poisson": Poisson,
    "negbin": NegativeBinomial,
}


#: The article's log-rate clip (``hbjax fit --clip``).
ARTICLE_CLIP = (-4.0, 20.0)


def checked_clip(clip: tuple[float, float] | None) -> tuple[float, float] | None:
    """``clip`` as floats ``(lo, hi)`` with ``lo < hi`` (``None``: no clip).

    The log-rate clip of the article (``(-4, 20)``): rates outside it are taken at its
    edges, and their gradients are then 0.

    Raises:
        ValueError: not two numbers with ``lo < hi``.
    """
    if clip is None:
        return None
    try:
        lo, hi = (float(v) for v in clip)
    except (TypeError, ValueError):
        raise ValueError(f"clip_log_rate must be (lo, hi); got {clip!r}.") from None
    if not lo < hi:
        raise ValueError(f"clip_log_rate must be (lo, hi) with lo < hi; got {clip!r}.")
    return lo, hi


def make_likelihood(likelihood: str | AbstractCountLikelihood) -> AbstractCountLikelihood:
    """A likelihood module from its name (``"poisson"``, ``"negbin"``) or itself."""
    if isinstance(likelihood, AbstractCountLikelihood):
        return likelihood
    if likelihood not in LIKELIHOODS:
        raise ValueError(
            f"likelihood must be one of {', '.join(LIKELIHOODS)} (or a likelihood module); "
            f"got {likelihood!r}."
        )
    return LIKELIHOODS[likelihood]()


__all__ = [
    "ARTICLE_CLIP",
    "checked_clip",
    "LIKELIHOODS",
    "AbstractCountLikelihood",
    "NegativeBinomial",
    "Poisson",
    "make_likelihood",
]
