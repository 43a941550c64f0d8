"""Summaries of draws or of Gaussian marginals: mean, sd and a 90% interval."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np

#: The quantiles every summary reports, by column name.
QUANTILES = {"q05": 0.05, "q50": 0.5, "q95": 0.95}


def draw_summary(draws: np.ndarray) -> dict[str, np.ndarray]:
    """Mean, sd and quantiles over the leading (sample) axis."""
    draws = np.asarray(draws, dtype=np.float64)
    stats = {
        "mean": np.asarray(draws.mean(axis=0)),
        "sd": np.asarray(draws.std(axis=0, ddof=1 if len(draws) > 1 else 0)),
    }
    quantiles = np.quantile(draws, list(QUANTILES.values()), axis=0)
    stats.update({name: np.asarray(q) for name, q in zip(QUANTILES, quantiles, strict=True)})
    return stats


def gaussian_summary(mean: np.ndarray, sd: np.ndarray) -> dict[str, np.ndarray]:
    """Mean, sd and quantiles of normals (the exact summaries of a Gaussian marginal)."""
    mean, sd = np.asarray(mean, np.float64), np.asarray(sd, np.float64)
    stats = {"mean": mean, "sd": sd}
    stats.update({name: mean + NormalDist().inv_cdf(q) * sd for name, q in QUANTILES.items()})
    return stats


__all__ = ["QUANTILES", "draw_summary", "gaussian_summary"]
