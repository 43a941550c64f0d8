"""The default guide against a NUTS gold standard (issue: honest uncertainty).

``tests/data/nuts_reference.npz`` holds the posterior of every product elasticity from
BlackJAX NUTS (4 chains x 1000 draws, split R-hat <= 1.01) on exactly hbjax's model for a
simulated 200 x 52 panel; ``benchmarks/nuts_validation.py reference`` regenerates it.
Monte Carlo error of the reference (ESS ~ 1000 per product) is ~0.03 NUTS sd on means and
~2% on sds, well inside the targets below (the issue's).
"""

import json
from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pytest

import hbjax

REFERENCE = Path(__file__).parent / "data" / "nuts_reference.npz"


@pytest.fixture(scope="module")
def reference():
    data = dict(np.load(REFERENCE))
    config = json.loads(str(data["config"]))
    assert config["chains"] >= 4 and float(data["rhat_max"]) < 1.01
    panel_config = {k: config[k] for k in ("n_units", "n_periods", "n_groups", "seed")}
    sim = hbjax.simulate(**panel_config)
    # the panel is the one the reference was run on
    np.testing.assert_allclose(sim.truth["elasticity"].to_numpy(), data["truth"], rtol=1e-12)
    return sim, data


@pytest.fixture(scope="module")
def default_fit(reference):
    sim, _ = reference
    data = hbjax.counts.elasticity_data(sim.frame)
    model, panel = data.model, data.rows  # centred prices and hierarchy
    guide = hbjax.make_guide("unitblock", model, loc=model.init_latents(panel))  # CLI default
    with jax.numpy_dtype_promotion("standard"):
        result = hbjax.fit(model, guide, panel, key=jax.random.key(0), steps=20000, progress=False)
    assert result.converged  # stopped by itself, averaged
    return data.summary(result.guide)  # exact Gaussian summaries


def test_default_guide_matches_nuts_on_product_elasticities(reference, default_fit):
    _, ref = reference
    units = default_fit["log_price/unit"]
    truth = ref["truth"]
    sd_ratio = np.median(units["sd"].to_numpy() / ref["unit_sd"])
    assert 0.9 <= sd_ratio <= 1.1, sd_ratio
    z = (units["mean"].to_numpy() - ref["unit_mean"]) / ref["unit_sd"]
    assert np.sqrt(np.mean(z**2)) < 0.15  # the target (was 0.25 before averaging)
    coverage = np.mean((units["q05"] <= truth) & (truth <= units["q95"]))
    nuts_coverage = np.mean((ref["unit_q05"] <= truth) & (truth <= ref["unit_q95"]))
    assert abs(coverage - nuts_coverage) <= 0.05, (coverage, nuts_coverage)


def test_default_guide_matches_nuts_on_category_elasticities(reference, default_fit):
    # Not an issue target, but the reason for the centred hierarchy: the non-centred one gives
    # category sds ~0.12 of NUTS's with any of our guides.
    _, ref = reference
    groups = default_fit["log_price/category"]
    ratio = groups["sd"].to_numpy() / ref["group_sd"]
    assert 0.8 <= np.median(ratio) <= 1.25, ratio
    z = (groups["mean"].to_numpy() - ref["group_mean"]) / ref["group_sd"]
    assert np.sqrt(np.mean(z**2)) < 0.25


NESTED = Path(__file__).parent / "data" / "nuts_reference_nested.npz"


@pytest.mark.usefixtures("standard_promotion")
def test_every_level_of_a_nested_panel_against_nuts():
    """Panel A's shape (issue "Honest at every level"): product < subcategory < category, a
    promo slope by category, negative binomial counts, missing rows, best sellers.

    ``tests/data/nuts_reference_nested.npz`` is ``benchmarks/levels_nuts.py nuts --shape A
    --products 120 --weeks 30 --categories 4`` (4 x 1,000 draws, no divergence, R-hat
    1.001; Monte Carlo error ~2-3% on sds) with its table (``table/<column>``). Measured,
    seeds 0-2: every level's sd ratio 0.99-1.02 with the default (dependent) guide,
    0.87-0.90 for the group levels without it (``dependent=False``; so this fails without
    it); mean errors 0.01-0.06 NUTS sd.
    """
    reference = dict(np.load(NESTED))
    frame = pd.DataFrame({k[6:]: v for k, v in reference.items() if k.startswith("table/")})
    data = hbjax.counts.elasticity_data(
        frame, groups=("subcategory", "category"), covariates=("promo",), likelihood="negbin"
    )
    result = hbjax.counts.fit_counts(data, hbjax.counts.FitConfig(progress=False))
    assert result.converged
    tables = data.summary(result.guide)
    for key, name in [
        ("log_price/global", "global elasticity"),
        ("log_price/category", "category elasticities"),
        ("log_price/subcategory", "subcategory elasticities"),
        ("log_price/unit", "product elasticities"),
        ("promo/category", "promo slope (category)"),
    ]:
        mean, sd = reference[f"{name}/mean"], reference[f"{name}/sd"]
        ratio = tables[key]["sd"].to_numpy() / sd
        error = (tables[key]["mean"].to_numpy() - mean) / sd
        assert 0.93 < np.median(ratio) < 1.07, (name, ratio)
        assert np.sqrt(np.mean(error**2)) < 0.15, (name, error)
