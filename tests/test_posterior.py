import warnings

import jax
import numpy as np
import pandas as pd
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


@pytest.mark.parametrize("max_unit_draws", [hbjax.posterior.MAX_UNIT_DRAWS, 4000 * 64])
def test_summaries_match_the_closed_form_of_a_mean_field_guide(recovery_fit, max_unit_draws):
    # The second case summarises the 300 units in chunks of 64 (memory-bounded path).
    # Under a mean-field normal guide and the (default) centred hierarchy, beta_i = -2 + 2 u_i
    # is normal with mean -2 + 2 loc_i and sd 2 s_i.
    _, panel, encoding, result = recovery_fit
    assert result.model.hierarchy.name == "centred"
    n = 4000
    summary = hbjax.summarize(
        result, encoding, num_samples=n, key=jax.random.key(9), max_unit_draws=max_unit_draws
    )
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
    # categories: beta_c = -2 + v_c (group scale 1)
    group_mean = -2.0 + np.asarray(loc.group_elasticity)
    group_sd = np.asarray(scale.group_elasticity)
    z = (summary.groups["mean"].to_numpy() - group_mean) / (group_sd / np.sqrt(n))
    assert np.abs(z).max() < 5
    assert np.abs(summary.groups["sd"].to_numpy() / group_sd - 1).max() < 5 * np.sqrt(1 / (2 * n))


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
    with pytest.raises(ValueError, match="encoding"):  # the chunked path too
        hbjax.summarize(result, other_encoding, num_samples=10, max_unit_draws=100)


def test_to_arviz_keeps_labels_and_works_with_arviz(recovery_fit, tmp_path):
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # ArviZ's refactor notice
        import arviz as az

    sim, panel, encoding, result = recovery_fit
    idata = hbjax.to_arviz(result, encoding, num_samples=400, key=jax.random.key(2))
    post = idata.posterior
    assert post["unit_elasticity"].dims == ("chain", "draw", "product")
    assert list(post["product"].values) == list(encoding.units)
    assert post["group_period_effect"].shape == (1, 400, panel.n_groups, panel.n_periods)
    table = az.summary(idata, var_names=["group_elasticity"], kind="stats")
    assert len(table) == panel.n_groups
    # the same posterior as summarize: group means within 5 Monte Carlo standard errors
    summary = hbjax.summarize(result, encoding, num_samples=4000, key=jax.random.key(3))
    means = post["group_elasticity"].mean(("chain", "draw")).values
    se = summary.groups["sd"].to_numpy() * np.sqrt(1 / 400 + 1 / 4000)
    assert np.all(np.abs(means - summary.groups["mean"].to_numpy()) < 5 * se)
    axes = az.plot_forest(idata, var_names=["group_elasticity"])
    axes[0].figure.savefig(tmp_path / "forest.png")
    assert (tmp_path / "forest.png").stat().st_size > 0


def test_predict_what_if_prices(recovery_fit, tmp_path):
    import pandas as pd

    sim, panel, encoding, result = recovery_fit
    products = list(encoding.units[:5])
    base = sim.frame.groupby("product")["price"].median().loc[products].to_numpy()
    frame = pd.DataFrame(
        {"product": products * 2, "price": np.r_[base, 1.1 * base], "note": ["x"] * 10}
    )
    out = hbjax.predict(result, encoding, frame, num_samples=2000, key=jax.random.key(4))
    assert list(out.columns[:3]) == ["product", "price", "note"]
    assert (out["expected_units_lo"] < out["expected_units"]).all()
    assert (out["expected_units"] < out["expected_units_hi"]).all()
    # a 10% price rise scales expected units by about 1.1 ** elasticity (Jensen: sd small)
    summary = hbjax.summarize(result, encoding, num_samples=2000, key=jax.random.key(5))
    beta = summary.units.set_index("product").loc[products, "mean"].to_numpy()
    ratio = out["expected_units"].to_numpy()[5:] / out["expected_units"].to_numpy()[:5]
    np.testing.assert_allclose(ratio, 1.1**beta, rtol=0.01)
    # a given period uses that period's category effect: it changes the level, not the ratio
    dated = frame.assign(period=int(encoding.periods[3]))
    at = hbjax.predict(result, encoding, dated, num_samples=2000, key=jax.random.key(4))
    np.testing.assert_allclose(
        at["expected_units"].to_numpy()[5:] / at["expected_units"].to_numpy()[:5], ratio, rtol=0.01
    )
    assert not np.allclose(at["expected_units"], out["expected_units"])
    # the saved fit predicts the same
    hbjax.save_fit(result, encoding, tmp_path / "fit")
    saved = hbjax.load_fit(tmp_path / "fit")
    again = hbjax.predict(saved, saved.encoding, frame, num_samples=2000, key=jax.random.key(4))
    np.testing.assert_allclose(again["expected_units"], out["expected_units"], rtol=1e-6)
    # the whole model comes back: the same prior (where the intercepts' prior sits included)
    assert saved.info["intercept_prior"] == "reference"
    latents = result.guide.mean()
    assert float(saved.model.log_prior(latents)) == float(result.model.log_prior(latents))
    # prices far from a product's typical price: a warning naming the rows, none in range
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hbjax.predict(result, encoding, frame, num_samples=10)
    assert not [w for w in caught if issubclass(w.category, hbjax.DataWarning)]
    far = frame.assign(price=frame["price"] * np.r_[1.0, 1.0, 3.5, 1.0, 0.25, [1.0] * 5])
    with pytest.warns(hbjax.DataWarning, match=r"typical price in 2 row\(s\), first at index 2, 4"):
        hbjax.predict(result, encoding, far, num_samples=10)
    for bad, words in (
        (frame.assign(product="nope"), "not seen"),
        (frame.assign(price=-1.0), "> 0"),
        (frame.drop(columns="price"), "needs columns"),
        (frame.assign(period=999), "periods the fit has not seen"),
        (frame.assign(price=1e-300), "beyond 1e300"),  # exp would overflow: no inf answer
    ):
        with pytest.raises(hbjax.DataValidationError, match=words) as error:
            hbjax.predict(result, encoding, bad, num_samples=10)
        assert "np." not in str(error.value)  # values as written, not np.float64(-1.0)


@pytest.mark.parametrize(
    ("kind", "hierarchy"),
    [("meanfield", "noncentred"), ("unitblock", "centred"), ("lowrank", "noncentred")],
)
def test_exact_elasticity_moments_match_many_draws(kind, hierarchy):
    # linear_moments against 100,000 draws of the same guide: the sds agree to 1% (MC error
    # 1/sqrt(2N) = 0.22%, so 4.5 sigma), the means to 5 MC standard errors; a wrong
    # coefficient or a missed covariance (unit-block pairs, the low-rank factor, the
    # non-centred sum of three layers) is off by far more.
    from hbjax.guide import linear_moments

    sim = hbjax.simulate(n_units=40, n_periods=12, n_groups=4, seed=2)
    panel, _ = hbjax.from_frame(sim.frame)
    model = hbjax.ElasticityModel.from_panel(panel, hierarchy=hierarchy)
    guide = hbjax.make_guide(kind, model, loc=model.init_latents(panel), key=jax.random.key(1))
    # spread the parameters so that every covariance term matters
    leaves, treedef = jax.tree.flatten(guide)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    guide = jax.tree.unflatten(
        treedef,
        [x + 0.5 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)],
    )
    moments = linear_moments(guide, model.elasticities)
    assert moments is not None
    mean, sd = moments
    n = 100_000
    draws = jax.vmap(model.elasticities)(guide.sample(n, key=jax.random.key(3)))
    for m, s, d in zip(mean, sd, draws, strict=True):
        d = np.asarray(d, np.float64)
        np.testing.assert_allclose(np.asarray(s), d.std(axis=0), rtol=0.01)
        assert np.all(np.abs(np.asarray(m) - d.mean(axis=0)) < 5 * d.std(axis=0) / np.sqrt(n))


@pytest.mark.usefixtures("standard_promotion")
def test_summaries_are_exact_and_need_no_draws(small_panel):
    panel, encoding = small_panel
    model = hbjax.ElasticityModel.from_panel(panel)
    guide = hbjax.make_guide("unitblock", model, loc=model.init_latents(panel))
    result = hbjax.fit(model, guide, panel, key=jax.random.key(0), steps=30, progress=False)
    one = hbjax.summarize(result, encoding, num_samples=10, key=jax.random.key(0))
    two = hbjax.summarize(result, encoding, num_samples=20, key=jax.random.key(1))
    assert one.exact and one.num_samples == 0
    pd.testing.assert_frame_equal(one.units, two.units)
    units = one.units
    # a 90% interval of a normal: q05 and q95 are 1.645 sd either side of the mean (= q50)
    np.testing.assert_allclose(units["q95"] - units["mean"], 1.6448536 * units["sd"], rtol=1e-6)
    np.testing.assert_allclose(units["q50"], units["mean"])
