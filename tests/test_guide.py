import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from tolerances import assert_f32_close, f32_rtol

import hbjax
from hbjax import LowRankNormal, MeanFieldNormal, UnitBlockNormal
from hbjax.vi.guide import make_guide


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
    # softplus and its inverse in float32: a few roundings of values of size ~1
    np.testing.assert_allclose(guide.scale["b"], 0.1, rtol=f32_rtol(terms=8))
    np.testing.assert_allclose(
        guide.scale["a"], np.log1p(np.exp(guide.raw_scale["a"])), rtol=f32_rtol(terms=4)
    )


def test_sample_shapes_and_log_prob_against_scipy(guide):
    z, log_q = guide.sample_and_log_prob(5, key=jax.random.key(0))
    assert z["a"].shape == (5,) and z["b"].shape == (5, 3) and log_q.shape == (5,)
    expected = stats.norm(1.0, float(guide.scale["a"])).logpdf(np.asarray(z["a"])) + stats.norm(
        np.asarray(guide.loc["b"]), np.asarray(guide.scale["b"])
    ).logpdf(np.asarray(z["b"])).sum(axis=1)
    # 4 coordinates, each log density a handful of float32 operations
    assert_f32_close(log_q, expected, terms=4 * 8)


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


SHAPES = {
    "shared": jax.ShapeDtypeStruct((2,), jnp.float32),
    "slope": jax.ShapeDtypeStruct((4,), jnp.float32),
    "level": jax.ShapeDtypeStruct((4,), jnp.float32),
}
UNIT_LEAVES = {"shared": False, "slope": True, "level": True}


def _perturbed(guide, seed):
    """Every array parameter moved by N(0, 0.5) noise (a generic, correlated guide)."""
    leaves, treedef = jax.tree.flatten(guide)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    moved = [x + 0.5 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, moved)


@pytest.fixture
def block():
    return _perturbed(UnitBlockNormal.from_shapes(SHAPES, UNIT_LEAVES), 0)


def _dense_unit_block_log_q(guide, z):
    """log q by scipy: shared leaves independent normals, each unit a 2-d normal."""
    total = stats.norm(np.asarray(guide.loc["shared"]), np.asarray(guide.scale["shared"]))
    out = total.logpdf(np.asarray(z["shared"])).sum(axis=1)
    cov = np.asarray(guide.unit_covariance(), np.float64)
    for u in range(4):
        mean = [float(guide.loc["level"][u]), float(guide.loc["slope"][u])]  # leaf order
        x = np.stack([np.asarray(z["level"])[:, u], np.asarray(z["slope"])[:, u]], axis=1)
        out += stats.multivariate_normal(mean, cov[u]).logpdf(x)
    return out


def test_unit_block_log_prob_against_scipy(block):
    z, log_q = block.sample_and_log_prob(6, key=jax.random.key(1))
    # 10 coordinates, each a few float32 operations (2x2 solves): terms of size |log q|
    assert_f32_close(log_q, _dense_unit_block_log_q(block, z), terms=10 * 16)
    assert_f32_close(block.log_prob(z), log_q, terms=10 * 16)


def test_unit_block_sample_covariance_within_monte_carlo_error(block):
    n = 20000
    z = block.sample(n, key=jax.random.key(2))
    x = np.stack([np.asarray(z["level"]), np.asarray(z["slope"])], axis=-1)  # [n, unit, 2]
    cov = np.asarray(block.unit_covariance())
    for u in range(4):
        sample = np.cov(x[:, u].T)
        # se of a covariance entry: sqrt((s_ii s_jj + s_ij^2) / n)
        se = np.sqrt((np.outer(np.diag(cov[u]), np.diag(cov[u])) + cov[u] ** 2) / n)
        assert np.all(np.abs(sample - cov[u]) < 5 * se), (u, sample, cov[u])


def test_unit_block_without_correlation_is_mean_field():
    loc = {"shared": jnp.ones(2), "slope": jnp.arange(4.0), "level": -jnp.arange(4.0)}
    block = UnitBlockNormal.from_shapes(SHAPES, UNIT_LEAVES, loc=loc, scale=0.3)
    mean_field = MeanFieldNormal.from_shapes(SHAPES, loc=loc, scale=0.3)
    key = jax.random.key(3)
    (z1, q1), (z2, q2) = (
        block.sample_and_log_prob(5, key=key),
        mean_field.sample_and_log_prob(5, key=key),
    )
    for name in SHAPES:
        np.testing.assert_array_equal(z1[name], z2[name])
    assert_f32_close(q1, q2, terms=10 * 16)  # the 2x2 solve vs a division per coordinate


def test_unit_block_restrict_and_weights(block):
    units = jnp.array([2, 0])
    local = block.restrict(units, UNIT_LEAVES)
    assert local.unit_tril.shape == (1, 2)
    z = local.sample(3, key=jax.random.key(4))
    weights = {"shared": 1.0, "slope": jnp.array([2.0, 2.0]), "level": jnp.array([2.0, 2.0])}
    log_q = local.log_prob(z, weights)
    # weight 2 on every unit term == shared terms + 2 x (the two units' joint densities)
    shared = stats.norm(np.asarray(block.loc["shared"]), np.asarray(block.scale["shared"]))
    expected = shared.logpdf(np.asarray(z["shared"])).sum(axis=1)
    cov = np.asarray(block.unit_covariance(), np.float64)
    for slot, u in enumerate([2, 0]):
        mean = [float(block.loc["level"][u]), float(block.loc["slope"][u])]
        x = np.stack([np.asarray(z["level"])[:, slot], np.asarray(z["slope"])[:, slot]], axis=1)
        expected += 2 * stats.multivariate_normal(mean, cov[u]).logpdf(x)
    assert_f32_close(log_q, expected, terms=6 * 16, magnitude=2 * np.abs(expected).max())
    mask = block.unit_update_mask(jnp.array([True, False, False, True]), UNIT_LEAVES)
    assert mask.unit_tril.shape == (4,) and mask.loc["slope"].shape == (4,)


def test_unit_block_needs_unit_leaves():
    with pytest.raises(ValueError, match="unit_leaves"):
        UnitBlockNormal.from_shapes(SHAPES, None)
    with pytest.raises(ValueError, match="one length"):
        UnitBlockNormal.from_shapes(SHAPES, {"shared": True, "slope": True, "level": False})


@pytest.fixture
def low_rank():
    guide = LowRankNormal.from_shapes(SHAPES, rank=3, key=jax.random.key(0))
    return _perturbed(guide, 1)


def test_low_rank_log_prob_against_scipy(low_rank):
    z, log_q = low_rank.sample_and_log_prob(6, key=jax.random.key(5))
    flat = np.concatenate([np.asarray(z[k]) for k in ("level", "shared", "slope")], axis=1)
    mean = np.concatenate([np.asarray(low_rank.loc[k]) for k in ("level", "shared", "slope")])
    cov = np.asarray(low_rank.covariance(), np.float64)
    # float32 Woodbury vs float64 dense. A (backward-stable) solve through a covariance
    # of condition number k loses k * eps relative, so the density's parts (quadratic
    # form, log determinant, the Woodbury correction, the constant) are each off by up to
    # k * eps times their size (a few |log q|); the perturbed guide has k ~ 2e3
    expected = stats.multivariate_normal(mean, cov).logpdf(flat)
    terms, magnitude = 4, np.linalg.cond(cov) * np.abs(expected).max()
    assert_f32_close(log_q, expected, terms=terms, magnitude=magnitude)
    # the same density from the draws' own path and from log_prob: two float32 orders
    assert_f32_close(low_rank.log_prob(z), log_q, terms=terms, magnitude=magnitude)


def test_low_rank_sample_covariance_within_monte_carlo_error(low_rank):
    n = 20000
    z = low_rank.sample(n, key=jax.random.key(6))
    flat = np.concatenate([np.asarray(z[k]) for k in ("level", "shared", "slope")], axis=1)
    cov = np.asarray(low_rank.covariance(), np.float64)
    se = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n)
    assert np.all(np.abs(np.cov(flat.T) - cov) < 5 * se)
    marginal = np.concatenate(
        [np.asarray(low_rank.marginal_scale()[k]) for k in ("level", "shared", "slope")]
    )
    # diag + sum of 3 squared factors, then a sqrt
    np.testing.assert_allclose(marginal, np.sqrt(np.diag(cov)), rtol=f32_rtol(terms=8))


def test_make_guide_by_name(small_model):
    for kind, cls in (
        ("meanfield", MeanFieldNormal),
        ("unitblock", UnitBlockNormal),
        ("lowrank", LowRankNormal),
    ):
        assert isinstance(make_guide(kind, small_model), cls)
        assert isinstance(make_guide(cls, small_model), cls)  # the class or its name
    for unknown in ("fullrank", hbjax.GaussianGuide):
        with pytest.raises(ValueError, match="unknown guide"):
            make_guide(unknown, small_model)
    with pytest.raises(TypeError, match="minibatch"):
        make_guide("lowrank", small_model).sample_and_log_prob(2, key=jax.random.key(0), weights={})
