"""Learned spreads: each slope level's sd a latent with a half-normal prior."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import hbjax
from hbjax.io.tables import DataValidationError


def eqx_replace(z, spreads):
    """``z`` with its learned spreads' latents replaced (``None``: the fixed model's)."""
    return eqx.tree_at(lambda t: t.spreads, z, spreads, is_leaf=lambda x: x is None)


@pytest.fixture(scope="module")
def narrow():
    """Products' elasticities 0.1 apart (the fixed prior allows 2), little data each."""
    sim = hbjax.simulate(n_units=60, n_periods=12, n_groups=3, unit_sd=0.1, mean_units=5, seed=1)
    fixed = hbjax.counts.elasticity_data(sim.frame)
    learned = hbjax.counts.elasticity_data(sim.frame, learn_spreads=True)
    return sim, fixed, learned


def test_the_prior_of_a_spread_is_the_half_normal_of_the_levels(narrow):
    _, fixed, learned = narrow
    model = learned.model
    layer = model.slopes["log_price"]
    shapes = model.latent_shapes()
    assert set(shapes.spreads["log_price"]) == {"category", "unit"}
    rng = np.random.default_rng(0)
    z = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.5, s.shape), s.dtype), shapes)
    # at eta = 0 the learned model is the fixed one, plus the half-normal at its scale
    # (log 2 - log(2 pi) / 2 - 1 / 2 per sd, in eta = log(sd / scale))
    at_zero = eqx_replace(z, jax.tree.map(jnp.zeros_like, z.spreads))
    fixed_z = eqx_replace(at_zero, None)
    difference = float(model.log_prior(at_zero)) - float(fixed.model.log_prior(fixed_z))
    constant = 2 * (np.log(2) - 0.5 * np.log(2 * np.pi) - 0.5)
    np.testing.assert_allclose(difference, constant, atol=2e-3)  # float32 sums of ~100 terms
    # against scipy: moving the sds changes the levels' normal densities and the priors
    values = layer.group_values(z.slopes["log_price"])
    units = layer.unit_values(
        z.slopes["log_price"], values, model._unit_level(layer), model.n_units
    )
    category_of = np.asarray(model._unit_level(layer))
    parent = {
        "category": np.asarray(values["global"]),
        "unit": np.asarray(values["category"])[category_of],
    }
    value = {"category": np.asarray(values["category"]), "unit": np.asarray(units)}
    scale = {"category": layer.scales[0], "unit": layer.unit_scale}

    def reference(eta):
        total = 0.0
        for level, e in eta.items():
            sd = scale[level] * np.exp(e)
            total += stats.norm.logpdf(value[level], parent[level], sd).sum()
            total += stats.halfnorm.logpdf(sd, scale=scale[level]) + np.log(sd)  # d sd / d eta
        return total

    eta = {"category": 0.7, "unit": -1.3}
    moved = eqx_replace(z, {"log_price": {k: jnp.float32(v) for k, v in eta.items()}})
    got = float(model.log_prior(moved)) - float(model.log_prior(at_zero))
    want = reference(eta) - reference({"category": 0.0, "unit": 0.0})
    np.testing.assert_allclose(got, want, rtol=1e-4)


@pytest.mark.usefixtures("standard_promotion")
def test_learned_spreads_shrink_products_to_their_groups(narrow, tmp_path):
    """With the fixed sd of 2 each product keeps its own noisy estimate; learned, the sd
    comes down to what the products' spread allows (measured, seeds 0-3: RMSE against the
    true elasticities 0.69-0.89 fixed, 0.15-0.20 learned)."""
    sim, fixed, learned = narrow
    truth = sim.truth.set_index("product")["elasticity"]
    config = hbjax.counts.FitConfig(steps=3000, progress=False, seed=1)
    rmse = {}
    for name, data in (("fixed", fixed), ("learned", learned)):
        result = hbjax.counts.fit_counts(data, config)
        tables = data.summary(result.guide)
        estimate = tables["log_price/unit"]["mean"]
        rmse[name] = float(np.sqrt(np.mean((estimate - truth.loc[estimate.index]) ** 2)))
    assert rmse["learned"] < 0.5 * rmse["fixed"], rmse
    sd = tables["log_price/unit sd"].loc["sd"]
    assert tables["log_price/unit sd"].attrs["summary"].startswith("exact")
    assert 0.05 < sd["q05"] < sd["mean"] < sd["q95"] < 1.0  # far below the fixed 2
    hbjax.counts.save_fit(learned, result, tmp_path / "fit")
    loaded = hbjax.counts.load_fit(tmp_path / "fit")
    assert loaded.data.spec.learn_spreads
    again = loaded.data.summary(loaded.guide)["log_price/unit sd"]
    np.testing.assert_allclose(again.to_numpy(), tables["log_price/unit sd"].to_numpy(), rtol=1e-6)


def test_learned_spreads_need_the_centred_hierarchy(narrow):
    sim, _, _ = narrow
    needs = "learn_spreads needs hierarchy='centred'"
    with pytest.raises((ValueError, DataValidationError), match=needs):
        hbjax.counts.elasticity_data(sim.frame, learn_spreads=True, hierarchy="noncentred")
