"""The dependent guide: a hierarchy's children follow their parents' draws."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import assert_f32_close

import hbjax
from hbjax.vi.guide import DependentNormal, linear_moments
from hbjax.vi.model import ParentLink

#: A Gaussian hierarchy: mu ~ N(0, 1.5), group_j ~ N(mu, 0.8), unit_i ~ N(group_g(i), 0.5),
#: y_i ~ N(unit_i, noise_i). Groups of 1, 2, 3 and 6 units, two in three of them precise.
GROUP = np.array([0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3, 3])
SD = {"mu": 1.5, "group": 0.8, "unit": 0.5}
NOISE = np.where(np.arange(12) % 3 == 0, 1.0, 0.1)
Y = np.random.default_rng(0).normal(0.7, 1.0, 12)


class GaussianTree(hbjax.AbstractModel):
    index: jax.Array

    def latent_shapes(self):
        shape = lambda *n: jax.ShapeDtypeStruct(n, jnp.float32)  # noqa: E731
        return {"mu": shape(), "group": shape(4), "unit": shape(12)}

    def log_prior(self, z):
        normal = jax.scipy.stats.norm.logpdf
        return (
            normal(z["mu"], 0.0, SD["mu"])
            + normal(z["group"], z["mu"], SD["group"]).sum()
            + normal(z["unit"], z["group"][self.index], SD["unit"]).sum()
        )

    def log_likelihood(self, z, y):
        return jax.scipy.stats.norm.logpdf(y, z["unit"], NOISE).sum()

    def parent_links(self):
        # flattened latents: group 0, mu 1, unit 2
        return (ParentLink(0, 1), ParentLink(2, 0, self.index))


def exact_posterior():
    """Mean, sd and mean-field sd (``1 / sqrt(precision_ii)``) in the order mu, group, unit."""
    n = 17
    eye, precision, shift = np.eye(n), np.zeros((n, n)), np.zeros(n)
    terms = [(eye[0], 0.0, SD["mu"])]
    terms += [(eye[1 + j] - eye[0], 0.0, SD["group"]) for j in range(4)]
    terms += [(eye[5 + i] - eye[1 + GROUP[i]], 0.0, SD["unit"]) for i in range(12)]
    terms += [(eye[5 + i], Y[i], NOISE[i]) for i in range(12)]
    for a, b, s in terms:  # -(a.x - b)^2 / (2 s^2)
        precision += np.outer(a, a) / s**2
        shift += a * b / s**2
    sd = np.sqrt(np.diag(np.linalg.inv(precision)))
    return np.linalg.solve(precision, shift), sd, 1.0 / np.sqrt(np.diag(precision))


def ordered(tree):
    return np.concatenate([np.atleast_1d(np.asarray(tree[k])) for k in ("mu", "group", "unit")])


@pytest.mark.usefixtures("standard_promotion")
@pytest.mark.parametrize("seed", [0, 1])
def test_a_gaussian_hierarchy_is_fitted_exactly(seed):
    mean, sd, mean_field_sd = exact_posterior()
    # what a guide without the dependence can reach at best: the precise lone unit's
    # group 0.59 of its sd, the top 0.87
    assert mean_field_sd.min() / sd[np.argmin(mean_field_sd / sd)] < 0.65
    model = GaussianTree(jnp.asarray(GROUP, jnp.int32))
    base = hbjax.MeanFieldNormal.from_shapes(model.latent_shapes())
    guide = DependentNormal(base, model.parent_links())
    result = hbjax.fit(
        model,
        guide,
        jnp.asarray(Y, jnp.float32),
        key=jax.random.key(seed),
        steps=20_000,
        progress=False,
    )
    assert result.converged
    # measured over seeds 0-3: every sd within 0.1%, every mean within 0.002 sd; a
    # broken move (coef ignored, or a parent's variance not passed on) is 13-41% off
    ratio = ordered(result.guide.marginal_scale()) / sd
    np.testing.assert_allclose(ratio, 1.0, atol=0.02)
    error = np.abs(ordered(result.guide.mean()) - mean) / sd
    assert np.all(error < 0.02), error


@pytest.fixture(scope="module")
def moved(small_data):
    """A unit-block dependent guide of the small panel with every parameter perturbed."""
    model = small_data.model
    guide = hbjax.make_guide("unitblock", model, dependent=True)
    leaves, treedef = jax.tree.flatten(guide)
    rng = np.random.default_rng(5)
    leaves = [
        x + jnp.asarray(rng.normal(0, 0.4, x.shape), x.dtype)
        if jnp.issubdtype(x.dtype, jnp.floating)
        else x
        for x in leaves
    ]
    return model, jax.tree.unflatten(treedef, leaves)


def test_the_move_keeps_the_density_and_its_moments(moved):
    model, guide = moved
    assert isinstance(guide, DependentNormal) and len(guide.links) == len(model.parent_links())
    z, log_q = guide.sample_and_log_prob(8, key=jax.random.key(0))
    # unit Jacobian: the density of a moved draw is its base draw's
    assert_f32_close(guide.log_prob(z), log_q, terms=4 * model.n_units)
    assert_f32_close(guide.base.log_prob(guide._moved(z, -1.0)), log_q, terms=4 * model.n_units)
    # the closed-form marginal sds against the exact moments of the affine map
    mean, sd = linear_moments(guide, lambda z: z)
    for got, want in zip(jax.tree.leaves(guide.marginal_scale()), jax.tree.leaves(sd)):
        assert_f32_close(got, want, terms=8)
    for got, want in zip(jax.tree.leaves(guide.mean()), jax.tree.leaves(mean)):
        assert_f32_close(got, want, terms=8)
    # and the coefficients matter: the units' slopes are wider than the base's
    unit = guide.marginal_scale().slopes["log_price"]["unit"]
    assert np.all(
        np.asarray(unit) > np.asarray(guide.base.marginal_scale().slopes["log_price"]["unit"])
    )


def test_a_batch_of_units_is_the_same_guide(moved):
    model, guide = moved
    units = jnp.asarray(np.random.default_rng(0).permutation(model.n_units), jnp.int32)
    flags = model.unit_leaves()
    z = guide.sample(4, key=jax.random.key(1))
    taken = jax.tree.map(lambda x, unit: jnp.take(x, units, axis=-1) if unit else x, z, flags)
    # every unit, in another order: the same density
    assert_f32_close(
        guide.restrict(units, flags).log_prob(taken), guide.log_prob(z), terms=4 * model.n_units
    )
    mask = guide.unit_update_mask(jnp.arange(model.n_units) < 3, flags)
    assert np.asarray(mask.coef[1]).tolist() == [True] * 3 + [False] * (model.n_units - 3)


def test_links_are_checked_when_the_guide_is_built(small_data):
    model = small_data.model
    base = hbjax.MeanFieldNormal.from_shapes(model.latent_shapes())
    links = model.parent_links()
    with pytest.raises(ValueError, match="parents first"):
        DependentNormal(base, links[::-1])
    with pytest.raises(ValueError, match="shaped like the child"):
        DependentNormal(base, (ParentLink(links[1].child, links[1].parent, links[1].index[:3]),))
    with pytest.raises(ValueError, match="not lowrank"):
        hbjax.make_guide("lowrank", model, dependent=True)
    assert type(hbjax.make_guide("meanfield", model)) is hbjax.MeanFieldNormal
