import jax
import numpy as np
import pytest

import hbjax


def test_summary_tables_on_original_labels(recovery_fit):
    sim, panel, encoding, result = recovery_fit
    summary = hbjax.summarize(result, encoding, num_samples=100)
    assert list(summary.units.columns) == ["product", "category", "mean", "sd", "q05", "q50", "q95"]
    assert list(summary.groups.columns) == ["category", "mean", "sd", "q05", "q50", "q95"]
    assert len(summary.units) == panel.n_units and len(summary.groups) == panel.n_groups
    # units keep their own group's label
    merged = summary.units.merge(sim.truth, on="product", suffixes=("", "_truth"))
    assert (merged["category"] == merged["category_truth"]).all()
    assert (summary.units["q05"] <= summary.units["q50"]).all()
    assert (summary.units["q50"] <= summary.units["q95"]).all()
    assert summary.overall["parameter"].tolist() == ["global elasticity"]


def test_summaries_match_the_closed_form_of_a_mean_field_guide(recovery_fit):
    # Under a mean-field normal guide and the (default) centred hierarchy, beta_i = -2 + 2 u_i
    # is normal with mean -2 + 2 loc_i and sd 2 s_i.
    _, panel, encoding, result = recovery_fit
    assert result.model.hierarchy == "centred"
    n = 4000
    summary = hbjax.summarize(result, encoding, num_samples=n, key=jax.random.key(9))
    loc, scale = result.guide.loc, result.guide.scale
    mean = -2.0 + 2.0 * np.asarray(loc.unit_elasticity)
    sd = 2.0 * np.asarray(scale.unit_elasticity)
    z = (summary.units["mean"].to_numpy() - mean) / (sd / np.sqrt(n))
    assert np.abs(z).max() < 5  # 300 units: a 5-sigma miss has probability ~2e-4
    rel = summary.units["sd"].to_numpy() / sd - 1
    assert np.abs(rel).max() < 5 * np.sqrt(1 / (2 * n))
    np.testing.assert_allclose(
        summary.units["q95"] - summary.units["q05"], 2 * 1.6449 * sd, rtol=0.1
    )


def test_sample_posterior_is_deterministic_given_the_key(recovery_fit):
    _, _, _, result = recovery_fit
    a = hbjax.sample_posterior(result, 30, key=jax.random.key(1), batch_size=7)
    b = hbjax.sample_posterior(result, 30, key=jax.random.key(1), batch_size=7)
    assert a.unit_elasticity.shape == (30, result.model.unit_effect.shape[0])
    np.testing.assert_array_equal(a.unit_elasticity, b.unit_elasticity)
    with pytest.raises(ValueError, match="num_samples"):
        hbjax.sample_posterior(result, 0, key=jax.random.key(1))


def test_encoding_mismatch_is_refused(recovery_fit, small_panel):
    _, _, _, result = recovery_fit
    _, other_encoding = small_panel
    with pytest.raises(ValueError, match="encoding"):
        hbjax.summarize(result, other_encoding, num_samples=10)
