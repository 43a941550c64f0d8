"""How far is the guide from the posterior? Pareto-smoothed importance sampling diagnostics.

Draw ``S`` latents from the guide and weigh each by ``w_s = p(data, z_s) / q(z_s)``. If q
were the posterior every weight would be equal. The shape ``k`` of a generalised Pareto
distribution fitted to the largest weights (Vehtari et al. 2024, "Pareto smoothed
importance sampling"; Yao et al. 2018, "Yes, but did it work?") says how heavy their tail
is: ``k < 0.5`` good, ``0.5 <= k < 0.7`` usable, ``k >= 0.7`` the guide misses part of the
posterior and importance sampling cannot repair it. The effective sample size
``(sum w)^2 / sum w^2`` says how many of the ``S`` draws count.

In high dimension (tens of thousands of latents) ``k`` is often large even when the
marginals that matter are accurate: the check is on the joint distribution. Use it to
compare guides on one model, and validate intervals against MCMC on a subsample (see
``benchmarks/nuts_validation.py``).
"""

from __future__ import annotations

import dataclasses
import math

import equinox as eqx
import jax
import numpy as np

from .._types import PRNGKeyArray, PyTree
from .guide import AbstractGuide
from .model import AbstractModel
from .objectives import log_weights

#: ``k`` thresholds of the verdict (Vehtari et al. 2024, section 3).
K_GOOD, K_OK = 0.5, 0.7
#: Log weights within this many float32 ulps of their magnitude count as equal: an exact
#: guide's weights differ only by the rounding of ``log p - log q`` (a few ulps per
#: operation, over tens of operations).
_TIE_ULPS = 64


def _gpd_fit(exceedances: np.ndarray) -> tuple[float, float]:
    """Shape ``k`` and scale ``sigma`` of a generalised Pareto fit (Zhang & Stephens 2009).

    ``exceedances``: sorted ascending, positive. The shape is shrunk towards 0.5 with a
    weak prior (as in Vehtari et al. 2024, appendix C: ``(n k + 10 * 0.5) / (n + 10)``).
    """
    x = np.asarray(exceedances, np.float64)
    n = len(x)
    m = 30 + int(math.sqrt(n))
    # A grid of theta = -k / sigma candidates, weighted by their profile likelihood.
    theta = 1 - np.sqrt(m / (np.arange(1, m + 1) - 0.5))
    theta = theta / (3 * x[int(n / 4 + 0.5) - 1]) + 1 / x[-1]
    k = np.mean(np.log1p(-theta[:, None] * x), axis=1)
    log_lik = n * (np.log(-theta / k) - k - 1)
    weights = 1 / np.sum(np.exp(log_lik[None, :] - log_lik[:, None]), axis=1)
    keep = weights >= 10 * np.finfo(float).eps
    weights, theta = weights[keep] / weights[keep].sum(), theta[keep]
    theta_hat = float(np.sum(theta * weights))
    k_hat = float(np.mean(np.log1p(-theta_hat * x)))
    sigma = -k_hat / theta_hat
    return (n * k_hat + 10 * 0.5) / (n + 10), sigma


def _gpd_quantile(p: np.ndarray, k: float, sigma: float) -> np.ndarray:
    if abs(k) < 1e-12:
        return -sigma * np.log1p(-p)
    return sigma * np.expm1(-k * np.log1p(-p)) / k


def psis(log_w: np.ndarray) -> tuple[np.ndarray, float]:
    """Pareto-smoothed, normalised log weights and the tail shape ``k``.

    Args:
        log_w: ``[S]`` log importance weights (any additive constant).

    Returns:
        ``(smoothed, k)``: ``smoothed`` are normalised log weights (``logsumexp == 0``)
        whose largest ``M = min(S / 5, 3 sqrt(S))`` are replaced by the fitted tail's
        quantiles (and capped at the largest raw weight); ``k`` is ``inf`` when the tail
        has 4 or fewer draws, ``-inf`` when all weights are equal (to float32 rounding
        of log weights of their size).
    """
    x = np.asarray(log_w, np.float64).copy()
    if x.ndim != 1 or len(x) < 2 or not np.all(np.isfinite(x)):
        raise ValueError(f"log_w must be a finite 1-d array of 2 or more draws; got {x.shape}.")
    # Weights equal up to float32 rounding of log densities of this size are ties.
    ties = _TIE_ULPS * np.finfo(np.float32).eps * max(1.0, float(np.max(np.abs(x))))
    x -= x.max()
    tail_len = int(math.ceil(min(0.2 * len(x), 3 * math.sqrt(len(x)))))
    order = np.argsort(x)
    cutoff = max(x[order[-tail_len - 1]], np.log(np.finfo(float).tiny))
    tail = np.flatnonzero(x > cutoff)
    # Ties at the top (e.g. the exact posterior: equal weights) leave no tail: no heavy tail.
    k = -math.inf if np.ptp(x) <= ties else math.inf
    if len(tail) > 4:
        tail = tail[np.argsort(x[tail])]
        k, sigma = _gpd_fit(np.exp(x[tail]) - np.exp(cutoff))
        if np.isfinite(k):
            p = np.arange(0.5, len(tail)) / len(tail)
            x[tail] = np.log(_gpd_quantile(p, k, sigma) + np.exp(cutoff))
            x = np.minimum(x, 0.0)
    x -= np.log(np.sum(np.exp(x - x.max()))) + x.max()
    return x, float(k)


def importance_sample_size(log_w: np.ndarray) -> float:
    """Kish's effective sample size ``(sum w)^2 / sum w^2`` of importance weights."""
    x = np.asarray(log_w, np.float64)
    w = np.exp(x - x.max())
    return float(w.sum() ** 2 / np.sum(w**2))


@dataclasses.dataclass(frozen=True)
class ImportanceDiagnostics:
    """PSIS diagnostics of a guide against its model.

    Attributes:
        k_hat: Pareto tail shape of the importance weights (lower is better).
        ess: effective sample size of the raw importance weights.
        num_draws: draws from the guide.
    """

    k_hat: float
    ess: float
    num_draws: int

    @property
    def verdict(self) -> str:
        """A plain-language reading of ``k_hat``."""
        k = f"k-hat {self.k_hat:.2f}"
        if self.k_hat < K_GOOD:
            return f"good ({k} < {K_GOOD}): the guide is close to the posterior."
        if self.k_hat < K_OK:
            return f"ok ({k} < {K_OK}): the guide is usable; importance weights are reliable."
        return (
            f"poor ({k} >= {K_OK}): the guide misses part of the joint posterior. In many "
            "dimensions this is common even when marginal intervals are fine; compare guides "
            "(--guide) and check intervals against MCMC on a subsample."
        )

    def to_dict(self) -> dict[str, object]:
        """For JSON: ``k_hat`` (``None`` if infinite), ``ess``, ``num_draws``, ``verdict``."""
        return {
            "k_hat": self.k_hat if math.isfinite(self.k_hat) else None,
            "ess": self.ess,
            "num_draws": self.num_draws,
            "verdict": self.verdict,
        }


def importance_diagnostics(
    model: AbstractModel,
    guide: AbstractGuide,
    panel: PyTree,
    *,
    key: PRNGKeyArray,
    num_draws: int = 500,
    batch_size: int = 50,
) -> ImportanceDiagnostics:
    """PSIS ``k`` and effective sample size of ``guide`` against ``model`` on ``panel``.

    Args:
        model: the model.
        guide: a fitted guide.
        panel: the full data (a placed panel works; a minibatch does not: the weights need
            the full likelihood).
        key: PRNG key for the draws.
        num_draws: draws from the guide (at least 10; several hundred for a stable ``k``).
        batch_size: draws evaluated at once (bounds memory).
    """
    if isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < 10:
        raise ValueError(f"num_draws must be an int >= 10; got {num_draws!r}.")

    @eqx.filter_jit
    def draw(guide: AbstractGuide, model: AbstractModel, panel: PyTree, key: PRNGKeyArray):  # noqa: ANN202
        return log_weights(model, guide, panel, key=key, num_particles=batch_size)

    parts = [
        np.asarray(draw(guide, model, panel, jax.random.fold_in(key, i)))
        for i in range(-(-num_draws // batch_size))
    ]
    log_w = np.concatenate(parts)[:num_draws]
    if not np.all(np.isfinite(log_w)):
        return ImportanceDiagnostics(math.inf, 0.0, num_draws)
    _, k = psis(log_w)
    return ImportanceDiagnostics(k, importance_sample_size(log_w), num_draws)


__all__ = [
    "ImportanceDiagnostics",
    "importance_sample_size",
    "importance_diagnostics",
    "psis",
]
