"""Minibatch SVI: batches of whole units drawn per block, unbiased, sharding-compatible."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import f32_rtol

import hbjax
from hbjax.minibatch import UnitSampler, seed_from_key, units_in_batch
from hbjax.objectives import log_weights


@pytest.fixture(scope="module")
def mini():
    """A small panel, its centred model and a start guide with spread-out scales."""
    sim = hbjax.simulate(n_units=96, n_periods=12, n_groups=3, seed=3)
    panel, encoding = hbjax.from_frame(sim.frame)
    model = hbjax.ElasticityModel.from_panel(panel)
    guide = hbjax.MeanFieldNormal.from_shapes(
        model.latent_shapes(), loc=model.init_latents(panel), scale=0.05
    )
    return sim, panel, encoding, model, guide


@pytest.mark.parametrize("n_devices", [1, 4])
def test_log_weights_are_unbiased(mini, n_devices):
    """Mean over batches of each particle's log weight == its full-data log weight."""
    _, panel, _, model, guide = mini
    sampler = UnitSampler(panel, 24, mesh=hbjax.make_mesh(n_devices), n_blocks=8, seed=1)
    key = jax.random.key(7)

    # Fix the particles: draw the full latent vector once, and score the batch's slice.
    particles = guide.sample(2, key=key)
    full = jax.vmap(lambda z: model.log_joint(z, panel))(particles)
    full = full - guide.log_prob(particles)

    unit_leaves = model.unit_leaves()

    @jax.jit
    def batch_weights(batch):  # noqa: ANN001, ANN202
        local = guide.restrict(batch.unit, unit_leaves)
        z = jax.tree.map(
            lambda x, is_unit: jnp.take(x, batch.unit, axis=-1) if is_unit else x,
            particles,
            unit_leaves,
        )
        weights = jax.tree.map(lambda is_unit: batch.weight if is_unit else 1.0, unit_leaves)
        log_q = jnp.zeros(2)
        for zl, loc, scale, w in zip(
            jax.tree.leaves(z),
            jax.tree.leaves(local.loc),
            jax.tree.leaves(local.scale),
            jax.tree.leaves(weights),
            strict=True,
        ):
            dens = w * jax.scipy.stats.norm.logpdf(zl, loc, scale)
            log_q = log_q + jnp.sum(dens.reshape(2, -1), axis=1)
        log_p = jax.vmap(lambda zi: model.batch_log_joint(zi, batch))(z)
        return log_p - log_q

    draws = np.stack([np.asarray(batch_weights(sampler.batch(s))) for s in range(400)])
    mean, se = draws.mean(axis=0), draws.std(axis=0, ddof=1) / np.sqrt(len(draws))
    assert np.all(se > 0)
    # unbiased: the mean of 400 batches is within 4 Monte Carlo standard errors
    assert np.all(np.abs(mean - np.asarray(full)) < 4 * se), (mean, np.asarray(full), se)


def test_batches_do_not_depend_on_the_device_count(mini):
    _, panel, _, _, _ = mini
    one = UnitSampler(panel, 24, mesh=hbjax.make_mesh(1), n_blocks=8, seed=1)
    four = UnitSampler(panel, 24, mesh=hbjax.make_mesh(4), n_blocks=8, seed=1)
    for step in (0, 5):
        a, b = one.host_batch(step), four.host_batch(step)
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
    batch = one.batch(3)
    # each block contributes its share of whole units; weights sum to the unit count
    # a float32 sum of the batch's weights: one rounding per slot
    assert float(jnp.sum(batch.weight)) == pytest.approx(
        panel.n_units, rel=f32_rtol(len(batch.weight))
    )
    in_batch = np.asarray(units_in_batch(batch))
    assert in_batch.sum() == 24
    # the slots hold the units' own rows
    u = int(batch.unit[0])
    rows = panel.unit_idx == u
    observed = np.asarray(batch.observed[0])
    assert observed.sum() == rows.sum()
    periods = panel.cell_idx[rows] % panel.n_periods
    np.testing.assert_allclose(np.asarray(batch.counts[0])[periods], panel.counts[rows])


def test_the_objective_takes_a_batch_and_only_batch_units_get_gradients(mini):
    _, panel, _, model, guide = mini
    sampler = UnitSampler(panel, 24, n_blocks=8, seed=2)
    batch = sampler.batch(0)
    grads = eqx.filter_grad(
        lambda g: hbjax.renyi_elbo(model, g, batch, key=jax.random.key(0), num_particles=2)
    )(guide)
    in_batch = np.asarray(units_in_batch(batch))
    for leaf in (grads.loc.unit_elasticity, grads.raw_scale.unit_effect):
        leaf = np.asarray(leaf)
        assert np.all(leaf[~in_batch] == 0.0) and np.any(leaf[in_batch] != 0.0)
    assert np.all(np.asarray(grads.loc.group_period_effect) != 0.0)  # shared: every step
    # log_weights dispatches on the batch type
    assert log_weights(model, guide, batch, key=jax.random.key(0), num_particles=3).shape == (3,)


def test_units_outside_the_batch_are_untouched(mini, standard_promotion):
    _, panel, _, model, guide = mini
    result = hbjax.fit(
        model, guide, panel, key=jax.random.key(0), steps=1, batch_size=24, progress=False
    )
    sampler = UnitSampler(panel, 24, seed=seed_from_key(jax.random.key(0)))
    in_batch = np.asarray(units_in_batch(sampler.batch(0)))
    moved = np.asarray(result.guide.loc.unit_elasticity) != np.asarray(guide.loc.unit_elasticity)
    np.testing.assert_array_equal(moved, in_batch)
    assert np.all(np.asarray(result.guide.loc.group_period_effect) != guide.loc.group_period_effect)
    assert result.batch_size == 24 and result.epochs == pytest.approx(24 / 96)


def test_minibatch_fit_recovers_as_well_as_the_full_batch(recovery_fit, standard_promotion):
    sim, panel, encoding, full = recovery_fit
    model = full.model
    guide = hbjax.MeanFieldNormal.from_shapes(model.latent_shapes(), loc=model.init_latents(panel))
    steps = 4000
    result = hbjax.fit(
        model, guide, panel, key=jax.random.key(1), steps=steps, batch_size=60, progress=False
    )
    assert result.epochs == pytest.approx(steps * 72 / 300)  # 60 rounded up to 72 = 3 x 24
    truth = sim.truth.set_index("product").loc[list(encoding.units), "elasticity"].to_numpy()

    def rmse(r):  # noqa: ANN001, ANN202
        beta = np.asarray(model.natural(r.guide.loc).unit_elasticity)
        return float(np.sqrt(np.mean((beta - truth) ** 2)))

    print(f"minibatch {rmse(result):.4f} full {rmse(full):.4f}")
    assert rmse(result) <= 1.10 * rmse(full)


@pytest.mark.parametrize(
    "batch_size, error, words",
    [
        (0, ValueError, "at least 1"),
        (-3, ValueError, "at least 1"),
        (96, ValueError, "not smaller than the number of units"),
        (500, ValueError, "not smaller than the number of units"),
        (2.5, TypeError, "batch_size"),  # at test time jaxtyping checks it first
    ],
)
def test_bad_batch_sizes_are_clear_errors(mini, batch_size, error, words):
    _, panel, _, model, guide = mini
    with pytest.raises(error, match=words):
        hbjax.fit(
            model,
            guide,
            panel,
            key=jax.random.key(0),
            steps=1,
            batch_size=batch_size,
            progress=False,
        )


def test_batch_size_is_rounded_up_to_the_blocks(mini):
    _, panel, _, _, _ = mini
    sampler = UnitSampler(panel, 10, mesh=hbjax.make_mesh(4), n_blocks=8)
    assert sampler.batch_size == 16 and sampler.per_block == 2  # documented adjustment
    assert sampler.steps_per_epoch == pytest.approx(96 / 16)


def test_placed_panels_and_models_without_unit_leaves_are_refused(mini):
    _, panel, _, model, guide = mini
    placed = hbjax.shard_panel(panel, hbjax.make_mesh(1))
    with pytest.raises(TypeError, match="host Panel"):
        hbjax.fit(
            model, guide, placed, key=jax.random.key(0), steps=1, batch_size=8, progress=False
        )

    class Plain(hbjax.AbstractModel):  # the same model without the minibatch capability
        inner: hbjax.ElasticityModel

        def latent_shapes(self):  # noqa: ANN202
            return self.inner.latent_shapes()

        def log_prior(self, z):  # noqa: ANN001, ANN202
            return self.inner.log_prior(z)

        def log_likelihood(self, z, data):  # noqa: ANN001, ANN202
            return self.inner.log_likelihood(z, data)

    class Undeclared(hbjax.ElasticityModel):  # a unit model that declares no unit leaves
        def unit_leaves(self):  # noqa: ANN202
            return None

    undeclared = Undeclared(panel.unit_group, panel.n_groups, panel.n_periods)
    for plain in (Plain(model), undeclared):
        with pytest.raises(TypeError, match="cannot be minibatched"):
            hbjax.fit(
                plain, guide, panel, key=jax.random.key(0), steps=1, batch_size=8, progress=False
            )


def test_only_guides_that_factorise_over_units_are_minibatched(mini):
    _, panel, _, model, _ = mini
    low_rank = hbjax.make_guide("lowrank", model)
    with pytest.raises(TypeError, match="LowRankNormal is not an hbjax.AbstractMinibatchGuide"):
        hbjax.fit(
            model, low_rank, panel, key=jax.random.key(0), steps=1, batch_size=8, progress=False
        )
    with pytest.raises(TypeError, match="cannot be minibatched"):  # the objective checks too
        batch = UnitSampler(panel, 8, seed=0).batch(0)
        log_weights(model, low_rank, batch, key=jax.random.key(0), num_particles=2)

    class HalfDone(hbjax.AbstractMinibatchGuide):  # restrict and unit_update_mask left out
        loc: jax.Array

        def sample(self, num_particles, *, key):  # noqa: ANN001, ANN202
            return self.loc + jax.random.normal(key, (num_particles, *self.loc.shape))

        def log_prob(self, particles, weights=None):  # noqa: ANN001, ANN202
            return -0.5 * jnp.sum((particles - self.loc) ** 2, axis=-1)

    with pytest.raises(TypeError, match="abstract"):  # refused when built, not mid-fit
        HalfDone(jnp.zeros(3))


def test_memory_mapped_grid_gives_the_same_batches(mini, tmp_path):
    _, panel, _, _, _ = mini
    in_memory = UnitSampler(panel, 24, n_blocks=8, seed=4)
    mapped = UnitSampler(panel, 24, n_blocks=8, seed=4, memmap_dir=tmp_path)
    assert isinstance(mapped.grid["counts"], np.memmap)
    for name, value in in_memory.host_batch(2).items():
        np.testing.assert_array_equal(value, mapped.host_batch(2)[name])


def test_minibatch_fit_is_deterministic(mini, standard_promotion):
    _, panel, _, model, guide = mini
    run = functools.partial(
        hbjax.fit,
        model,
        guide,
        panel,
        key=jax.random.key(3),
        steps=30,
        batch_size=24,
        progress=False,
        chunk_size=7,
    )
    a, b = run(), run()
    np.testing.assert_array_equal(a.losses, b.losses)
    assert a.num_traces == 1 and len(a.losses) == 30


def test_a_saved_grid_is_memory_mapped_and_fits_the_same(mini, tmp_path, standard_promotion):
    _, panel, _, model, guide = mini
    key = jax.random.key(2)
    original = UnitSampler(panel, 24, seed=seed_from_key(key))
    original.save(tmp_path)
    loaded = UnitSampler.load(tmp_path, 24, seed=seed_from_key(key))
    assert isinstance(loaded.grid["log_price"], np.memmap)
    for name, value in original.host_batch(5).items():
        np.testing.assert_array_equal(value, loaded.host_batch(5)[name])
    from_panel = hbjax.fit(model, guide, panel, key=key, steps=12, batch_size=24, progress=False)
    from_grid = hbjax.fit(model, guide, loaded, key=key, steps=12, progress=False)
    np.testing.assert_array_equal(from_panel.losses, from_grid.losses)
    with pytest.raises(ValueError, match="differs from the sampler"):
        hbjax.fit(model, guide, loaded, key=key, steps=1, batch_size=48, progress=False)


def test_lazy_adam_keeps_units_outside_the_batch_still(mini, standard_promotion):
    """A unit drawn at step 0 but not at step 1 keeps its step-0 value (no stale momentum)."""
    _, panel, _, model, guide = mini
    key = jax.random.key(4)
    run = functools.partial(hbjax.fit, model, guide, panel, key=key, batch_size=24, progress=False)
    one, two = run(steps=1), run(steps=2)
    sampler = UnitSampler(panel, 24, seed=seed_from_key(key))
    first = np.asarray(units_in_batch(sampler.batch(0)))
    second = np.asarray(units_in_batch(sampler.batch(1)))
    resting = first & ~second
    assert resting.any()
    for leaf in ("unit_elasticity", "unit_effect"):
        after_one = np.asarray(getattr(one.guide.loc, leaf))
        after_two = np.asarray(getattr(two.guide.loc, leaf))
        np.testing.assert_array_equal(after_two[resting], after_one[resting])
        assert np.any(after_two[second] != after_one[second])
    # ... and its optimiser moments are those of step 0
    mu_one = jax.tree.leaves(one.opt_state)
    mu_two = jax.tree.leaves(two.opt_state)
    n_units = panel.n_units
    for a, b in zip(mu_one, mu_two, strict=True):
        if np.shape(a) == (n_units,):
            np.testing.assert_array_equal(np.asarray(b)[resting], np.asarray(a)[resting])
