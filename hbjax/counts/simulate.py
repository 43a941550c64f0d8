"""Synthetic elasticity panels with known truth (for the demo, the tests and the benchmarks).

The truth follows the model's hierarchy: a global elasticity, category elasticities around
it, product elasticities around their category, a product intercept and a
(category, period) effect; counts are Poisson with log-rate
``elasticity * log(price) + category_period_effect + product_effect``. The spreads are
realistic (narrower than the model's vague priors) and set in :class:`SimulationConfig`.

Prices are realistic: each product has a list price (log-normal, about $2 to $60), small
week-to-week variation, occasional promotions (10 to 40% off for a period) and a rare
permanent re-pricing. Panels are unbalanced: each (product, period) cell is missing with
probability ``missing`` and some products launch late.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from ..io.outputs import write_file_atomically


@dataclasses.dataclass(frozen=True)
class SimulationConfig:
    """Sizes and truth of a synthetic panel.

    Attributes:
        n_units: number of products.
        n_periods: number of periods (weeks).
        n_groups: number of categories.
        missing: probability that a (product, period) cell is missing.
        global_elasticity: mean of the global elasticity.
        global_sd: sd of the global elasticity around its mean.
        group_sd: sd of category elasticities around the global one.
        unit_sd: sd of product elasticities around their category's.
        mean_units: median units sold per period at list price.
        promo_rate: probability of a promotion in a period.
        dispersion: ``phi`` of negative-binomial counts (variance ``mu + phi mu^2``, a
            gamma-Poisson mixture); 0: Poisson counts.
        seed: random seed; equal seeds give equal panels.
    """

    n_units: int = 2000
    n_periods: int = 52
    n_groups: int = 10
    missing: float = 0.15
    global_elasticity: float = -2.0
    global_sd: float = 0.25
    group_sd: float = 0.4
    unit_sd: float = 0.5
    mean_units: float = 20.0
    promo_rate: float = 0.1
    dispersion: float = 0.0
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class SimulatedPanel:
    """A synthetic panel and its ground truth.

    Attributes:
        frame: long table ``product, category, period, price, units_sold``.
        truth: one row per product: ``product, category, elasticity, effect``.
        group_truth: one row per category: ``category, elasticity``.
        global_elasticity: the true global elasticity.
        config: the configuration that made it.
    """

    frame: pd.DataFrame
    truth: pd.DataFrame
    group_truth: pd.DataFrame
    global_elasticity: float
    config: SimulationConfig

    def write(self, path: str | Path) -> Path:
        """Write the panel to ``path`` (.csv or .parquet) and the truth beside it.

        ``PATH.truth.csv``: each product's category and elasticity. Each file is written
        whole or not at all. Returns the truth's path.
        """
        path = Path(path)
        if path.name.lower().endswith(".csv"):
            write_file_atomically(path, lambda tmp: self.frame.to_csv(tmp, index=False))
        else:
            write_file_atomically(path, lambda tmp: self.frame.to_parquet(tmp, index=False))
        truth_path = path.with_name(path.name + ".truth.csv")
        truth = self.truth[["product", "category", "elasticity"]]
        write_file_atomically(truth_path, lambda tmp: truth.to_csv(tmp, index=False))
        return truth_path


def simulate(config: SimulationConfig | None = None, **overrides: float | int) -> SimulatedPanel:
    """Simulate a panel with known elasticities.

    Args:
        config: sizes and truth; defaults to :class:`SimulationConfig`.
        **overrides: fields of the config to change, e.g. ``simulate(n_units=500, seed=3)``.

    Returns:
        The panel and its truth. Deterministic given the config.

    Example:
        >>> from hbjax import simulate
        >>> sim = simulate(n_units=50, n_periods=10, n_groups=3, seed=1)
        >>> sorted(sim.frame.columns)
        ['category', 'period', 'price', 'product', 'units_sold']
    """
    config = dataclasses.replace(config or SimulationConfig(), **overrides)
    if config.n_units < 1 or config.n_periods < 1 or config.n_groups < 1:
        raise ValueError("n_units, n_periods and n_groups must all be >= 1.")
    if not config.dispersion >= 0.0:
        raise ValueError(f"dispersion must be >= 0; got {config.dispersion}.")
    if not 0.0 <= config.missing < 1.0:
        raise ValueError(f"missing must be in [0, 1); got {config.missing}.")
    rng = np.random.default_rng(config.seed)
    n_u, n_t, n_g = config.n_units, config.n_periods, config.n_groups

    global_elasticity = config.global_elasticity + config.global_sd * rng.standard_normal()
    group_elasticity = global_elasticity + config.group_sd * rng.standard_normal(n_g)
    unit_group = np.sort(rng.integers(0, n_g, n_u))
    unit_group[: min(n_g, n_u)] = np.arange(min(n_g, n_u))  # every category has a product
    unit_elasticity = group_elasticity[unit_group] + config.unit_sd * rng.standard_normal(n_u)

    # (category, period) effects: yearly seasonality with a category phase, plus noise.
    t = np.arange(n_t)
    phase = rng.uniform(0, 2 * np.pi, n_g)
    amplitude = rng.uniform(0.1, 0.4, n_g)
    group_period = amplitude[:, None] * np.sin(2 * np.pi * t[None, :] / 52 + phase[:, None])
    group_period += 0.1 * rng.standard_normal((n_g, n_t))

    # Prices: list price, small noise, promotions, rare permanent changes.
    list_price = np.exp(rng.normal(np.log(12.0), 0.7, n_u))
    drift = np.cumsum(rng.random((n_u, n_t)) < 0.02, axis=1) * rng.normal(0, 0.05, (n_u, 1))
    noise = rng.normal(0, 0.03, (n_u, n_t))
    promo = (rng.random((n_u, n_t)) < config.promo_rate) * rng.uniform(0.1, 0.4, (n_u, n_t))
    price = np.round(list_price[:, None] * np.exp(drift + noise) * (1 - promo), 2)
    price = np.maximum(price, 0.01)

    # Intercept so that demand at list price is about mean_units (log-normal across units).
    base_log_units = np.log(config.mean_units) + 0.8 * rng.standard_normal(n_u)
    unit_effect = base_log_units - unit_elasticity * np.log(list_price)
    log_rate = (
        unit_elasticity[:, None] * np.log(price) + group_period[unit_group] + unit_effect[:, None]
    )
    rate = np.exp(np.minimum(log_rate, 20.0))
    if config.dispersion > 0:  # gamma-Poisson: mean rate, variance rate + phi rate^2
        shape = 1.0 / config.dispersion
        rate = rng.gamma(shape, rate / shape)
    counts = rng.poisson(rate)

    observed = rng.random((n_u, n_t)) >= config.missing
    launch = np.where(rng.random(n_u) < 0.1, rng.integers(0, max(n_t // 2, 1), n_u), 0)
    observed &= t[None, :] >= launch[:, None]
    observed[np.arange(n_u), np.minimum(launch, n_t - 1)] = True  # every product is seen

    units_idx, period_idx = np.nonzero(observed)
    product_names = np.array([f"P{i:0{len(str(n_u - 1))}d}" for i in range(n_u)])
    category_names = np.array([f"C{g:0{len(str(n_g - 1))}d}" for g in range(n_g)])
    frame = pd.DataFrame(
        {
            "product": product_names[units_idx],
            "category": category_names[unit_group[units_idx]],
            "period": period_idx.astype(np.int64),
            "price": price[units_idx, period_idx],
            "units_sold": counts[units_idx, period_idx].astype(np.int64),
        }
    )
    truth = pd.DataFrame(
        {
            "product": product_names,
            "category": category_names[unit_group],
            "elasticity": unit_elasticity,
            "effect": unit_effect,
        }
    )
    group_truth = pd.DataFrame({"category": category_names, "elasticity": group_elasticity})
    return SimulatedPanel(
        frame=frame,
        truth=truth,
        group_truth=group_truth,
        global_elasticity=float(global_elasticity),
        config=config,
    )
