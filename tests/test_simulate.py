import numpy as np
import pandas as pd

import hbjax


def test_deterministic_given_seed_and_different_across_seeds():
    a = hbjax.simulate(n_units=40, n_periods=12, n_groups=3, seed=4)
    b = hbjax.simulate(n_units=40, n_periods=12, n_groups=3, seed=4)
    c = hbjax.simulate(n_units=40, n_periods=12, n_groups=3, seed=5)
    pd.testing.assert_frame_equal(a.frame, b.frame)
    pd.testing.assert_frame_equal(a.truth, b.truth)
    assert not a.truth["elasticity"].equals(c.truth["elasticity"])


def test_panel_is_unbalanced_realistic_and_valid():
    sim = hbjax.simulate(n_units=500, n_periods=52, n_groups=5, missing=0.15, seed=0)
    cells = 500 * 52
    # 15% missing at random plus late launches (~10% of products, half the year on average)
    assert 0.75 * cells < len(sim.frame) < 0.86 * cells
    assert sim.frame["product"].nunique() == 500 and sim.frame["category"].nunique() == 5
    assert (sim.frame["price"] > 0).all() and (sim.frame["units_sold"] >= 0).all()
    # prices vary within products (promotions), far less than across products
    log_p = np.log(sim.frame["price"])
    within = log_p.groupby(sim.frame["product"]).std().median()
    across = log_p.groupby(sim.frame["product"]).mean().std()
    assert 0.03 < within < 0.3 and across > 3 * within
    # the truth follows the hierarchy: products spread around their category
    t = sim.truth.merge(sim.group_truth, on="category", suffixes=("", "_group"))
    spread = (t["elasticity"] - t["elasticity_group"]).std()
    assert abs(spread - sim.config.unit_sd) < 4 * sim.config.unit_sd / np.sqrt(2 * 500)
    data = hbjax.counts.elasticity_data(sim.frame)  # passes validation
    assert len(data.units) == 500
