import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from hbjax import MeanFieldNormal


@pytest.fixture
def guide():
    shapes = {
        "a": jax.ShapeDtypeStruct((), jnp.float32),
        "b": jax.ShapeDtypeStruct((3,), jnp.float32),
    }
    g = MeanFieldNormal.from_shapes(shapes, loc={"a": 1.0, "b": jnp.array([0.0, -1.0, 2.0])})
    return MeanFieldNormal(
        loc=g.loc, raw_scale={"a": g.raw_scale["a"] + 1.0, "b": g.raw_scale["b"]}
    )


def test_scale_is_softplus_of_raw(guide):
    np.testing.assert_allclose(guide.scale["b"], 0.1, rtol=1e-5)
    np.testing.assert_allclose(guide.scale["a"], np.log1p(np.exp(guide.raw_scale["a"])), rtol=1e-5)


def test_sample_shapes_and_log_prob_against_scipy(guide):
    z, log_q = guide.sample_and_log_prob(5, key=jax.random.key(0))
    assert z["a"].shape == (5,) and z["b"].shape == (5, 3) and log_q.shape == (5,)
    expected = stats.norm(1.0, float(guide.scale["a"])).logpdf(np.asarray(z["a"])) + stats.norm(
        np.asarray(guide.loc["b"]), np.asarray(guide.scale["b"])
    ).logpdf(np.asarray(z["b"])).sum(axis=1)
    np.testing.assert_allclose(log_q, expected, rtol=1e-5)


def test_sample_moments_within_monte_carlo_error(guide):
    n = 20000
    z = guide.sample(n, key=jax.random.key(1))
    for name in ("a", "b"):
        x = np.asarray(z[name])
        sd = np.asarray(guide.scale[name])
        # mean: 5 standard errors; variance: 5 standard errors (sd * sqrt(2/n) relative)
        assert np.all(np.abs(x.mean(0) - np.asarray(guide.loc[name])) < 5 * sd / np.sqrt(n))
        assert np.all(np.abs(x.std(0) / sd - 1) < 5 * np.sqrt(0.5 / n))


def test_from_shapes_validates():
    shapes = {"a": jax.ShapeDtypeStruct((2,), jnp.float32)}
    with pytest.raises(ValueError, match="scale"):
        MeanFieldNormal.from_shapes(shapes, scale=0.0)
    with pytest.raises(ValueError, match="structure"):
        MeanFieldNormal.from_shapes(shapes, loc={"b": jnp.zeros(2)})
