"""Posterior draws and summaries on the original labels."""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import numpy as np
import pandas as pd

from ._types import PRNGKeyArray, PyTree
from .data import Encoding
from .fit import FitResult

#: Quantiles reported by :func:`summarize` (a 90% central interval and the median).
QUANTILES = {"q05": 0.05, "q50": 0.5, "q95": 0.95}


def sample_posterior(
    result: FitResult, num_samples: int = 1000, *, key: PRNGKeyArray, batch_size: int = 250
) -> PyTree[np.ndarray]:
    """Draws from the fitted guide, on the model's natural scale, as host arrays.

    Args:
        result: a fit.
        num_samples: number of draws.
        key: PRNG key.
        batch_size: draws computed at once (bounds device memory).

    Returns:
        The model's latent pytree with a leading ``[num_samples]`` axis on every leaf.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1; got {num_samples}.")

    @eqx.filter_jit
    def draw(guide, model, n, key):  # noqa: ANN001, ANN202
        return jax.vmap(model.natural)(guide.sample(n, key=key))

    batches = []
    for i, start in enumerate(range(0, num_samples, batch_size)):
        n = min(batch_size, num_samples - start)
        batch = draw(result.guide, result.model, n, jax.random.fold_in(key, i))
        batches.append(jax.tree.map(np.asarray, batch))
    return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *batches)


def _describe(draws: np.ndarray) -> dict[str, np.ndarray]:
    """Mean, sd and quantiles over the leading (sample) axis."""
    draws = np.asarray(draws, dtype=np.float64)
    stats = {
        "mean": np.asarray(draws.mean(axis=0)),
        "sd": np.asarray(draws.std(axis=0, ddof=1 if len(draws) > 1 else 0)),
    }
    quantiles = np.quantile(draws, list(QUANTILES.values()), axis=0)
    stats.update({name: np.asarray(q) for name, q in zip(QUANTILES, quantiles, strict=True)})
    return stats


@dataclasses.dataclass(frozen=True)
class Summary:
    """Posterior summaries of the elasticities on the original labels.

    Each table has ``mean, sd, q05, q50, q95`` (a 90% interval and the median).

    Attributes:
        units: one row per unit: the unit and group columns named as in the input.
        groups: one row per group.
        overall: one row: the global elasticity.
        num_samples: draws the summaries are based on.
    """

    units: pd.DataFrame
    groups: pd.DataFrame
    overall: pd.DataFrame
    num_samples: int


def summarize(
    result: FitResult,
    encoding: Encoding,
    *,
    num_samples: int = 1000,
    key: PRNGKeyArray | None = None,
) -> Summary:
    """Summaries of unit, group and global elasticities on the natural scale.

    Args:
        result: a fit of an :class:`hbjax.ElasticityModel`.
        encoding: the labels from :func:`hbjax.from_frame`.
        num_samples: posterior draws to summarise (Monte Carlo error of a quantile is
            about ``sd * 1.3 / sqrt(num_samples)`` at the 5%/95% tails).
        key: PRNG key for the draws (default ``jax.random.key(0)``).

    Returns:
        A :class:`Summary`; ``summary.units`` has columns
        ``[unit, group, mean, sd, q05, q50, q95]``.
    """
    key = jax.random.key(0) if key is None else key
    draws = sample_posterior(result, num_samples, key=key)
    n_units = len(encoding.units)
    if draws.unit_elasticity.shape[-1] != n_units:
        raise ValueError(
            f"the fit has {draws.unit_elasticity.shape[-1]} units but the encoding has "
            f"{n_units}; pass the encoding returned with this fit's panel."
        )
    units = pd.concat(
        [encoding.unit_frame(), pd.DataFrame(_describe(draws.unit_elasticity))], axis=1
    )
    groups = pd.concat(
        [
            pd.DataFrame({encoding.group_column: encoding.groups}),
            pd.DataFrame(_describe(draws.group_elasticity)),
        ],
        axis=1,
    )
    overall = pd.DataFrame({k: [v] for k, v in _describe(draws.global_elasticity).items()})
    overall.insert(0, "parameter", ["global elasticity"])
    return Summary(units=units, groups=groups, overall=overall, num_samples=num_samples)
