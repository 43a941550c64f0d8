import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from tolerances import assert_f32_close, f32_rtol

import hbjax
from hbjax import layers


def joint_rtol(panel):
    """Two float32 log joints: sums of every row's and latent's log density (all <= 0)."""
    return f32_rtol(terms=panel.n_rows + 2 * panel.n_units + panel.n_cells + 16)


def test_layers_are_non_centred_and_compose():
    top = layers.Normal(-2.0, 1.0)
    mid = layers.Nested(1.0, shape=(3,))
    low = layers.Nested(2.0, index=jnp.array([0, 0, 2, 1]))
    z_top, z_mid, z_low = jnp.float32(0.5), jnp.array([0.1, -0.2, 0.3]), jnp.arange(4.0)
    beta_g = top(z_top)
    beta_c = mid(z_mid, beta_g)
    beta_i = low(z_low, beta_c)
    np.testing.assert_allclose(beta_g, -1.5)
    assert_f32_close(beta_c, -1.5 + np.array([0.1, -0.2, 0.3]), terms=2)
    np.testing.assert_allclose(beta_i, np.asarray(beta_c)[[0, 0, 2, 1]] + 2 * np.arange(4.0))
    assert low.latent_shape().shape == (4,) and mid.latent_shape().shape == (3,)
    # log prior of z equals the natural-scale density up to the constant log-Jacobian
    natural = stats.norm(np.asarray(beta_c)[[0, 0, 2, 1]], 2.0).logpdf(np.asarray(beta_i)).sum()
    assert_f32_close(low.log_prior(z_low), natural + 4 * np.log(2.0), terms=4 * 6, magnitude=10)


def test_layers_inside_user_jax_code():
    mid = layers.Nested(1.0, shape=(3,))

    @jax.jit
    def f(z):
        return mid.log_prior(z) + jnp.sum(mid(z, jnp.float32(1.0)))

    g = jax.grad(f)(jnp.ones(3))
    np.testing.assert_allclose(g, -jnp.ones(3) + 1.0)


def test_model_latent_shapes_and_natural(small_panel):
    panel, _ = small_panel
    noncentred = hbjax.ElasticityModel.from_panel(
        panel, centre_prices=False, hierarchy="noncentred"
    )
    centred = hbjax.ElasticityModel.from_panel(panel, centre_prices=False)
    assert isinstance(centred.hierarchy, hbjax.layers.Centred)  # the default
    shapes = noncentred.latent_shapes()
    assert shapes.unit_elasticity.shape == (panel.n_units,)
    assert shapes.group_period_effect.shape == (panel.n_groups * panel.n_periods,)
    z = jax.tree.map(lambda s: jnp.full(s.shape, 0.5, s.dtype), shapes)
    values = noncentred.natural(z)
    np.testing.assert_allclose(values.global_elasticity, -1.5)
    np.testing.assert_allclose(values.group_elasticity, -1.0)
    assert_f32_close(values.unit_elasticity, 0.0, terms=4, magnitude=2.0)  # -1 + 2 x 0.5
    np.testing.assert_allclose(values.unit_effect, 1.5)
    np.testing.assert_allclose(values.group_period_effect, 1.5)
    values = centred.natural(z)  # beta_c = -2 + 1 v_c, beta_i = -2 + 2 u_i
    np.testing.assert_allclose(values.group_elasticity, -1.5)
    np.testing.assert_allclose(values.unit_elasticity, -1.0)
    as_module = hbjax.ElasticityModel.from_panel(  # the module or its name: one model
        panel, centre_prices=False, hierarchy=hbjax.layers.NonCentred()
    )
    assert as_module.hierarchy == noncentred.hierarchy
    for a, b in zip(jax.tree.leaves(as_module.natural(z)), jax.tree.leaves(noncentred.natural(z))):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="hierarchy must be one of centred, noncentred"):
        hbjax.ElasticityModel.from_panel(panel, hierarchy="partial")


def test_centred_hierarchy_is_a_reparameterisation(small_panel, small_model):
    """Centred and non-centred latents of the same elasticities: same natural values and
    log joint (the map is a shift of each z by its parent: unit Jacobian), in full and in
    a minibatch's estimate."""
    panel, _ = small_panel
    noncentred = hbjax.ElasticityModel.from_panel(panel, hierarchy="noncentred")
    z = jax.tree.map(
        lambda s: jnp.asarray(np.random.default_rng(2).normal(0, 0.5, s.shape), s.dtype),
        noncentred.latent_shapes(),
    )
    v = noncentred.natural(z)
    u = eqx.tree_at(
        lambda t: (t.group_elasticity, t.unit_elasticity),
        z,
        ((v.group_elasticity + 2.0) / 1.0, (v.unit_elasticity + 2.0) / 2.0),
    )
    for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(small_model.natural(u)), strict=True):
        assert_f32_close(a, b, terms=8, magnitude=np.abs(b).max() + 1)  # a few roundings
    np.testing.assert_allclose(
        float(small_model.log_joint(u, panel)),
        float(noncentred.log_joint(z, panel)),
        rtol=joint_rtol(panel),
    )
    # the starts are the same natural values
    for a, b in zip(
        jax.tree.leaves(noncentred.natural(noncentred.init_latents(panel))),
        jax.tree.leaves(small_model.natural(small_model.init_latents(panel))),
        strict=True,
    ):
        assert_f32_close(a, b, terms=8, magnitude=np.abs(b).max() + 1)  # a few roundings
    # a minibatch's estimate too, at matching latents
    batch = hbjax.UnitSampler(panel, 40, n_blocks=4, mesh=hbjax.make_mesh(1)).batch(0)
    estimates = []
    for model, latents in ((noncentred, z), (small_model, u)):
        local = jax.tree.map(
            lambda x, is_unit: jnp.take(x, batch.unit, axis=-1) if is_unit else x,
            latents,
            model.unit_leaves(),
        )
        estimates.append(float(model.batch_log_joint(local, batch)))
    np.testing.assert_allclose(estimates[0], estimates[1], rtol=joint_rtol(panel))


def _reference_log_prices(panel) -> np.ndarray:
    """Each unit's mean log price weighted by counts + 1/2, computed here with NumPy."""
    w = np.asarray(panel.weight) * (np.asarray(panel.counts) + 0.5)
    idx = np.asarray(panel.unit_idx)
    total = np.bincount(idx, w, panel.n_units)
    return np.bincount(idx, w * np.asarray(panel.log_price), panel.n_units) / total


@pytest.mark.parametrize(
    ("hierarchy", "intercept_prior"),
    [("centred", "reference"), ("centred", "zero"), ("noncentred", "reference")],
)
def test_log_prior_is_the_natural_scale_density_plus_the_log_jacobian(
    small_panel, hierarchy, intercept_prior
):
    """beta_g ~ N(-2, 1), beta_c ~ N(beta_g, 1), beta_i ~ N(beta_c, 2), gamma ~ N(0, 3) and
    the intercept at its prior's price r_i (the reference price, or 0) ~ N(0, 3), written
    out here on the natural scale; the latents are affine in the natural values, so their
    log prior is this density plus log|Jacobian|: log 2 per product elasticity, log 3 per
    intercept and per (category, week) effect (shifts contribute nothing)."""
    panel, _ = small_panel
    model = hbjax.ElasticityModel.from_panel(
        panel, hierarchy=hierarchy, intercept_prior=intercept_prior
    )
    group_of = np.asarray(panel.unit_group)
    reference = _reference_log_prices(panel) if intercept_prior == "reference" else 0.0
    for seed in range(3):
        z = jax.tree.map(
            lambda s, seed=seed: jnp.asarray(
                np.random.default_rng(seed).normal(0, 0.7, s.shape), s.dtype
            ),
            model.latent_shapes(),
        )
        v = jax.tree.map(lambda x: np.asarray(x, np.float64), model.natural(z))
        intercept_at_prior = v.unit_effect + v.unit_elasticity * reference
        natural = (
            stats.norm.logpdf(v.global_elasticity, -2.0, 1.0)
            + stats.norm.logpdf(v.group_elasticity, v.global_elasticity, 1.0).sum()
            + stats.norm.logpdf(v.unit_elasticity, v.group_elasticity[group_of], 2.0).sum()
            + stats.norm.logpdf(intercept_at_prior, 0.0, 3.0).sum()
            + stats.norm.logpdf(v.group_period_effect, 0.0, 3.0).sum()
        )
        log_jacobian = panel.n_units * np.log(2.0 * 3.0) + panel.n_cells * np.log(3.0)
        # float32 sums of ~400 terms: ~1e-3 nats; a 0.1-nat error in any term fails
        np.testing.assert_allclose(
            float(model.log_prior(z)), natural + log_jacobian, rtol=0, atol=0.02
        )


def test_log_joint_is_prior_plus_kernel(small_panel, small_model):
    panel, _ = small_panel
    z = jax.tree.map(
        lambda s: jnp.asarray(np.random.default_rng(0).normal(0, 0.3, s.shape), s.dtype),
        small_model.latent_shapes(),
    )
    v = small_model.natural(z)
    lik = hbjax.elasticity_log_likelihood(
        v.unit_elasticity,
        v.unit_effect,
        v.group_period_effect,
        panel.unit_idx,
        panel.cell_idx,
        panel.log_price,
        panel.counts,
        panel.weight,
    )
    np.testing.assert_allclose(
        float(small_model.log_joint(z, panel)),
        float(small_model.log_prior(z)) + float(lik),
        rtol=joint_rtol(panel),
    )


def test_price_centring_is_a_reparameterisation(small_panel, small_model):
    """Centred and raw models: same natural values and log joint at matching latents."""
    panel, _ = small_panel
    raw = hbjax.ElasticityModel.from_panel(panel, centre_prices=False)
    assert raw.price_centre is None
    centre = np.asarray(small_model.price_centre)
    # the centre is each unit's mean log price weighted by counts + 1/2
    for unit in (0, 7, 51):
        rows = panel.unit_idx == unit
        expected = np.average(panel.log_price[rows], weights=panel.counts[rows] + 0.5)
        # a float32 weighted mean of n_periods log prices
        assert_f32_close(centre[unit], expected, terms=2 * panel.n_periods, magnitude=5.0)
    z_raw = jax.tree.map(
        lambda s: jnp.asarray(np.random.default_rng(1).normal(0, 0.5, s.shape), s.dtype),
        raw.latent_shapes(),
    )
    beta = raw.natural(z_raw).unit_elasticity
    z_centred = eqx.tree_at(lambda t: t.unit_effect, z_raw, z_raw.unit_effect + beta * centre / 3)
    for a, b in zip(
        jax.tree.leaves(raw.natural(z_raw)),
        jax.tree.leaves(small_model.natural(z_centred)),
        strict=True,
    ):
        assert_f32_close(a, b, terms=8, magnitude=np.abs(b).max() + 1)  # a few roundings
    np.testing.assert_allclose(
        float(small_model.log_joint(z_centred, panel)),
        float(raw.log_joint(z_raw, panel)),
        rtol=joint_rtol(panel),
    )
    # both start at the same natural values
    for a, b in zip(
        jax.tree.leaves(raw.natural(raw.init_latents(panel))),
        jax.tree.leaves(small_model.natural(small_model.init_latents(panel))),
        strict=True,
    ):
        assert_f32_close(a, b, terms=8, magnitude=np.abs(b).max() + 1)  # a few roundings
    with pytest.raises(ValueError, match="one value per unit"):
        hbjax.ElasticityModel.from_panel(panel, price_centre=np.zeros(3))


def test_init_is_a_shrunk_weighted_regression_per_unit(small_panel, small_model):
    panel, _ = small_panel
    z0 = small_model.init_latents(panel)
    v = small_model.natural(z0)
    beta, delta = np.asarray(v.unit_elasticity), np.asarray(v.unit_effect)
    for unit in (0, 7, 51):
        rows = panel.unit_idx == unit
        x = panel.log_price[rows].astype(np.float64)
        w = panel.counts[rows] + 0.5
        log_w = np.log(w)
        mean_x, mean_l = np.average(x, weights=w), np.average(log_w, weights=w)
        info = np.sum(w * (x - mean_x) ** 2)
        cross = np.sum(w * (x - mean_x) * (log_w - mean_l))
        prior_var = 1.0 + 1.0 + 4.0  # global, category and product prior variances
        expected = (cross - 2.0 / prior_var) / (info + 1 / prior_var)
        np.testing.assert_allclose(beta[unit], expected, rtol=1e-3, atol=1e-3)
        # intercept + (group, period) effect put the line through the weighted means
        gamma = np.asarray(v.group_period_effect)[panel.cell_idx[rows]]
        np.testing.assert_allclose(delta[unit] + gamma + beta[unit] * mean_x, mean_l, atol=1e-3)
    # each group's level is split between intercepts and (group, period) effects as their
    # N(0, 3) priors would: the MAP split of a constant level: sum(delta) = T * gamma ...
    gamma = np.asarray(v.group_period_effect).reshape(panel.n_groups, panel.n_periods)
    for g in range(panel.n_groups):
        np.testing.assert_allclose(gamma[g], gamma[g, 0])  # constant over periods
        total = delta[panel.unit_group == g].sum() - panel.n_periods * gamma[g, 0]
        np.testing.assert_allclose(total, 0.0, atol=1e-3)
    # categories start at their units' mean elasticity; deterministic (no key involved)
    group = np.asarray(v.group_elasticity)
    for g in range(panel.n_groups):
        members = beta[panel.unit_group == g]
        assert_f32_close(
            group[g], members.mean(), terms=len(members), magnitude=np.abs(members).max()
        )
    again = small_model.init_latents(panel)
    for a, b in zip(jax.tree.leaves(z0), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)


def test_clip_option_validated(small_panel):
    panel, _ = small_panel
    m = hbjax.ElasticityModel.from_panel(panel, clip_log_rate=(-4, 20))
    assert m.clip_log_rate == (-4.0, 20.0)
    try:
        hbjax.ElasticityModel.from_panel(panel, clip_log_rate=(3.0, 1.0))
    except ValueError as e:
        assert "lo < hi" in str(e)
    else:
        raise AssertionError("expected ValueError")
