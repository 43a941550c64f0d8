"""Any model's rows: block-ordered sums on 1..4 devices, whole-unit minibatches, fits."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import assert_f32_close, f32_rtol

import hbjax
from hbjax.parallel.rows import RowSampler, UnitRows, shard_rows
from hbjax.vi import layers


class Latents(eqx.Module):
    overall: jax.Array
    log_noise: jax.Array
    unit: jax.Array


class RandomIntercepts(hbjax.AbstractRowModel):
    """y = m_u + N(0, sigma), m_u ~ N(mu, 2) (centred): a Gaussian model, not a count one."""

    overall: layers.Normal
    log_noise: layers.Normal
    n_units: int = eqx.field(static=True)

    def __init__(self, n_units):
        self.overall = layers.Normal(0.0, 5.0)
        self.log_noise = layers.Normal(0.0, 1.0)
        self.n_units = n_units

    def latent_shapes(self):
        unit = jax.ShapeDtypeStruct((self.n_units,), jnp.float32)
        return Latents(self.overall.latent_shape(), self.log_noise.latent_shape(), unit)

    def unit_leaves(self):
        return Latents(False, False, True)

    def shared_log_prior(self, z):
        return self.overall.log_prior(z.overall) + self.log_noise.log_prior(z.log_noise)

    def unit_log_prior(self, z):
        return layers.normal_log_prob(z.unit, self.overall(z.overall), 2.0)

    def row_log_likelihood(self, z, rows):
        sd = jnp.exp(self.log_noise(z.log_noise))
        return layers.normal_log_prob(rows.columns["y"], z.unit[rows.unit], sd)

    def restrict(self, units):
        return RandomIntercepts(units.shape[0])  # nothing else is indexed by unit


def _data(seed=0, n_units=60):
    rng = np.random.default_rng(seed)
    truth = 1.5 + 2.0 * rng.normal(size=n_units)
    unit = np.repeat(np.arange(n_units), rng.integers(1, 30, n_units))
    y = truth[unit] + 0.7 * rng.normal(size=len(unit))
    order = rng.permutation(len(unit))  # build() sorts the rows by unit
    rows = UnitRows.build(unit[order], {"y": y[order].astype(np.float32)}, n_units=n_units)
    return rows, truth


def _latents(seed, n_units):
    rng = np.random.default_rng(seed)
    return Latents(
        jnp.float32(rng.normal()),
        jnp.float32(0.1 * rng.normal()),
        jnp.asarray(rng.normal(size=n_units), jnp.float32),
    )


def test_build_sorts_by_unit_and_names_bad_input():
    rows = UnitRows.build(np.array([2, 0, 1, 0]), {"y": np.arange(4.0)}, n_units=4)
    np.testing.assert_array_equal(rows.unit, [0, 0, 1, 2])
    np.testing.assert_array_equal(rows.columns["y"], [1.0, 3.0, 2.0, 0.0])  # stable
    np.testing.assert_array_equal(rows.unit_rows, [2, 1, 1, 0])
    with pytest.raises(ValueError, match=r"column \['y'\] has shape \(3,\)"):
        UnitRows.build(np.array([0, 1, 1, 0]), {"y": np.zeros(3)})
    with pytest.raises(ValueError, match="units must run from 0 to n_units - 1 = 1"):
        UnitRows.build(np.array([0, 2]), {"y": np.zeros(2)}, n_units=2)
    with pytest.raises(ValueError, match="unit must be a 1-d array of ints"):
        UnitRows.build(np.array([0.0, 1.0]), {"y": np.zeros(2)})


def test_a_row_model_must_write_every_piece():
    class Incomplete(hbjax.AbstractRowModel):  # no row_log_likelihood, no restrict
        def latent_shapes(self):
            return ()

        def unit_leaves(self):
            return ()

        def shared_log_prior(self, z):
            return 0.0

        def unit_log_prior(self, z):
            return jnp.zeros(0)

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()


@pytest.mark.parametrize("seed", [0, 1])
def test_sharded_sums_and_gradients_equal_the_plain_ones_on_any_device_count(seed):
    rows, _ = _data(seed)
    model = RandomIntercepts(rows.n_units)
    z = _latents(seed, rows.n_units)

    def reference(z):  # the plain formula, written out here
        mean = z.unit[rows.unit]
        sd = jnp.exp(model.log_noise(z.log_noise))
        return model.log_prior(z) + jnp.sum(layers.normal_log_prob(rows.columns["y"], mean, sd))

    want, want_grad = jax.value_and_grad(reference)(z)
    got = {}
    for devices in (1, 2, 4):
        placed = shard_rows(rows, hbjax.make_mesh(devices), n_blocks=8)
        assert placed.n_blocks == 8 and float(jnp.sum(placed.weight)) == len(rows.unit)
        got[devices] = jax.jit(jax.value_and_grad(model.log_joint))(z, placed)
        value, grad = got[devices]
        # per block, then in block order, vs one sum: float32 rounding of every row's term
        n = len(rows.unit) + rows.n_units + 4
        np.testing.assert_allclose(float(value), float(want), rtol=f32_rtol(terms=n))
        for g, w in zip(jax.tree.leaves(grad), jax.tree.leaves(want_grad), strict=True):
            assert_f32_close(g, w, terms=n, magnitude=np.abs(w).max())
    # summed per block and then in block order: bit for bit the same on 2 and 4 devices
    for a, b in zip(jax.tree.leaves(got[2]), jax.tree.leaves(got[4]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_minibatches_do_not_depend_on_the_device_count_and_are_unbiased():
    rows, _ = _data(3)
    model = RandomIntercepts(rows.n_units)
    z = _latents(3, rows.n_units)
    one = RowSampler(rows, 12, mesh=hbjax.make_mesh(1), n_blocks=4, seed=5)
    four = RowSampler(rows, 12, mesh=hbjax.make_mesh(4), n_blocks=4, seed=5)
    for a, b in zip(
        jax.tree.leaves(one.host_batch(7)), jax.tree.leaves(four.host_batch(7)), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    # each slot's rows are its unit's rows
    batch = one.batches(0, 1)
    rows_unit = np.asarray(batch.unit)[0][np.asarray(batch.rows.unit)[0]]
    real = np.asarray(batch.rows.weight)[0] > 0
    assert real.sum() == sum(rows.unit_rows[u] for u in np.asarray(batch.unit)[0])
    assert np.all(
        np.bincount(rows_unit[real], minlength=rows.n_units)[np.asarray(batch.unit)[0]]
        == rows.unit_rows[np.asarray(batch.unit)[0]]
    )

    full = float(model.log_joint(z, rows))

    @jax.jit
    def estimate(batch):
        local = jax.tree.map(lambda x, f: x[batch.unit] if f else x, z, model.unit_leaves())
        return model.batch_log_joint(local, batch)

    draws = 400
    batches = one.batches(0, draws)
    values = np.array(
        [float(estimate(jax.tree.map(lambda x: x[i], batches))) for i in range(draws)]
    )
    # the mean of unbiased estimates is within 4 standard errors of the full log joint
    error = values.std(ddof=1) / np.sqrt(draws)
    assert abs(values.mean() - full) < 4 * error, (values.mean(), full, error)
    assert error < 0.05 * abs(full)  # and the test could tell a 5% bias


@pytest.mark.usefixtures("standard_promotion")
def test_fits_sharded_and_minibatched_reach_the_exact_posterior_means():
    rows, truth = _data(4, n_units=80)
    model = RandomIntercepts(rows.n_units)
    raw = np.bincount(rows.unit, rows.columns["y"], rows.n_units) / rows.unit_rows
    start = Latents(jnp.float32(0.0), jnp.float32(0.0), jnp.asarray(raw, jnp.float32))
    means = {}
    for label, source in (
        ("1 device", hbjax.FullBatch(rows, hbjax.make_mesh(1))),
        ("4 devices", hbjax.FullBatch(rows, hbjax.make_mesh(4))),
        # 3.3 steps an epoch
        ("minibatch", hbjax.Minibatches(rows, batch_size=24, mesh=hbjax.make_mesh(4))),
    ):
        guide = hbjax.make_guide("unitblock", model, loc=start)
        result = hbjax.fit(
            model,
            guide,
            source,
            key=jax.random.key(0),
            steps=800,
            progress=False,
            convergence=None,
        )
        means[label] = np.asarray(result.guide.mean().unit)
        # the exact conditional posterior means given the fitted mu and noise sd
        mean = result.guide.mean()
        mu, sd = float(model.overall(mean.overall)), float(jnp.exp(model.log_noise(mean.log_noise)))
        n, total = rows.unit_rows, np.bincount(rows.unit, rows.columns["y"], rows.n_units)
        exact = (total / sd**2 + mu / 2.0**2) / (n / sd**2 + 1 / 2.0**2)
        gap = np.abs(means[label] - exact)
        assert np.median(gap) < 0.03 and gap.max() < 0.15, (label, np.median(gap), gap.max())
    np.testing.assert_allclose(means["1 device"], means["4 devices"], atol=2e-3)


class _UnitMeans(hbjax.AbstractUnitModel):
    """A unit model that is not a row model: its likelihood is not written per row."""

    n_units: int

    def latent_shapes(self):
        return {"mu": jax.ShapeDtypeStruct((self.n_units,), jnp.float32)}

    def log_prior(self, latents):
        return -0.5 * jnp.sum(latents["mu"] ** 2)

    def log_likelihood(self, latents, panel):
        return -0.5 * jnp.sum(latents["mu"] ** 2)

    def unit_leaves(self):
        return {"mu": True}

    def batch_log_joint(self, latents, batch):
        return self.log_prior(latents)

    def slot_log_joint(self, latents, batch):
        return -0.5 * latents["mu"] ** 2


def test_fit_refuses_to_minibatch_rows_with_a_model_that_is_not_a_row_model():
    rows, _ = _data(0)
    small_model = _UnitMeans(rows.n_units)
    guide = hbjax.make_guide("meanfield", small_model)
    with pytest.raises(TypeError, match="need an hbjax.AbstractRowModel"):
        hbjax.fit(
            small_model,
            guide,
            hbjax.Minibatches(rows, batch_size=5),
            key=jax.random.key(0),
            steps=10,
            progress=False,
        )
    with pytest.raises(TypeError, match="Put your data in hbjax.UnitRows"):
        hbjax.FullBatch({"y": np.zeros(3)}, hbjax.make_mesh(2))
