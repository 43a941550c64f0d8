import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from tolerances import assert_f32_close, f32_rtol

from hbjax.likelihood import elasticity_log_likelihood, elasticity_log_rate, poisson_log_likelihood


def random_params(panel, seed=0):
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.normal(-2.0, 0.5, panel.n_units), jnp.float32),
        jnp.asarray(rng.normal(4.0, 0.5, panel.n_units), jnp.float32),
        jnp.asarray(rng.normal(0.0, 0.3, panel.n_cells), jnp.float32),
    )


def rows(panel):
    return (panel.unit_idx, panel.cell_idx, panel.log_price, panel.counts, panel.weight)


def test_kernel_equals_scipy_poisson_logpmf(small_panel):
    panel, _ = small_panel
    beta, delta, gamma = random_params(panel)
    got = elasticity_log_likelihood(beta, delta, gamma, *rows(panel))
    rate = np.exp(
        np.asarray(beta, np.float64)[panel.unit_idx] * panel.log_price
        + np.asarray(delta, np.float64)[panel.unit_idx]
        + np.asarray(gamma, np.float64)[panel.cell_idx]
    )
    expected = stats.poisson.logpmf(panel.counts.astype(np.int64), rate).sum()
    # a float32 sum of n_rows log-probabilities (each <= 0, so no cancellation), each a
    # few roundings: within n_rows * eps of the sum, relative
    np.testing.assert_allclose(float(got), expected, rtol=f32_rtol(terms=panel.n_rows + 8))


def test_padding_rows_change_nothing(small_panel):
    panel, _ = small_panel
    beta, delta, gamma = random_params(panel, seed=1)
    base = elasticity_log_likelihood(beta, delta, gamma, *rows(panel))
    pad = 7
    rng = np.random.default_rng(3)
    padded = [
        np.concatenate([panel.unit_idx, rng.integers(0, panel.n_units, pad).astype(np.int32)]),
        np.concatenate([panel.cell_idx, rng.integers(0, panel.n_cells, pad).astype(np.int32)]),
        np.concatenate([panel.log_price, rng.normal(0, 1, pad).astype(np.float32)]),
        np.concatenate([panel.counts, rng.integers(0, 50, pad).astype(np.float32)]),
        np.concatenate([panel.weight, np.zeros(pad, np.float32)]),
    ]
    value, grads = jax.value_and_grad(elasticity_log_likelihood, argnums=(0, 1, 2))(
        beta, delta, gamma, *padded
    )
    base_grads = jax.grad(elasticity_log_likelihood, argnums=(0, 1, 2))(
        beta, delta, gamma, *rows(panel)
    )
    # zero-weight rows add exact zeros; only the sums' order (a longer array) may change
    np.testing.assert_allclose(float(value), float(base), rtol=f32_rtol(terms=panel.n_rows))
    for g, b in zip(grads, base_grads, strict=True):
        assert_f32_close(g, b, terms=panel.n_periods, magnitude=np.abs(b).max())


def test_weights_scale_the_sum():
    log_rate = jnp.array([0.1, 1.0, 2.0])
    counts = jnp.array([0.0, 3.0, 7.0])
    one = poisson_log_likelihood(log_rate, counts, jnp.ones(3))
    two = poisson_log_likelihood(log_rate, counts, jnp.full(3, 2.0))
    np.testing.assert_allclose(float(two), 2 * float(one), rtol=f32_rtol(terms=3 * 4))


def test_clip_matches_article(small_panel):
    panel, _ = small_panel
    beta, delta, gamma = random_params(panel)
    delta = delta.at[0].set(30.0).at[1].set(-30.0)
    rate = elasticity_log_rate(
        beta, delta, gamma, panel.unit_idx, panel.cell_idx, panel.log_price, clip=(-4.0, 20.0)
    )
    assert float(rate.max()) == 20.0 and float(rate.min()) == -4.0


def test_shapes_are_type_checked_at_test_time():
    # pytest runs with the jaxtyping import hook (pyproject addopts): mismatched named
    # dimensions are caught at the call, not deep inside XLA.
    import jaxtyping

    with pytest.raises(jaxtyping.TypeCheckError):
        poisson_log_likelihood(jnp.zeros(3), jnp.zeros(4), jnp.ones(3))


@pytest.mark.parametrize("centred", [False, True])
@pytest.mark.parametrize("n_devices", [None, 1, 4])
def test_dense_kernel_equals_the_reference_kernel(small_panel, n_devices, centred):
    import dataclasses

    import hbjax
    from hbjax.likelihood import dense_log_likelihood

    panel, _ = small_panel
    dense = hbjax.shard_panel(panel, hbjax.make_mesh(n_devices or 1), layout="dense")
    if n_devices is None:  # the kernel without shard_map
        dense = dataclasses.replace(dense, mesh=None)
    params = random_params(panel, seed=4)
    centre = None
    if centred:
        centre = jnp.asarray(np.random.default_rng(5).normal(1.0, 0.3, panel.n_units), jnp.float32)
    argnums = (0, 1, 2)
    fast = jax.jit(
        jax.value_and_grad(
            lambda b, d, g: dense_log_likelihood(b, d, g, dense, price_centre=centre),
            argnums=argnums,
        )
    )
    value, grads = fast(*params)
    ref_value, ref_grads = jax.value_and_grad(
        lambda b, d, g: elasticity_log_likelihood(b, d, g, *rows(panel), price_centre=centre),
        argnums=argnums,
    )(*params)
    # float32 sums of n_rows terms in another order (sufficient statistics, then per block);
    # the value's terms are log-probabilities (<= 0, no cancellation), a gradient entry's
    # terms are at most its largest entry in size
    np.testing.assert_allclose(float(value), float(ref_value), rtol=f32_rtol(terms=panel.n_rows))
    for g, r in zip(grads, ref_grads, strict=True):
        assert_f32_close(g, r, terms=panel.n_rows, magnitude=np.abs(r).max())


def test_dense_layout_refuses_the_clip(small_panel):
    import hbjax
    from hbjax.likelihood import dense_log_likelihood

    panel, _ = small_panel
    dense = hbjax.shard_panel(panel, hbjax.make_mesh(1), layout="dense")
    with pytest.raises(ValueError, match="layout='rows'"):
        dense_log_likelihood(*random_params(panel), dense, clip=(-4.0, 20.0))
