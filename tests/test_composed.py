"""Composed guides: parts over their own latents, a learning rate per part."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tolerances import assert_f32_close

import hbjax
from hbjax.vi.guide import ComposedGuide, linear_moments, part_labels
from hbjax.vi.step import scale_by_sd


@pytest.fixture(scope="module")
def pieces(small_data):
    """A perturbed unit-block guide, and the same guide as mean-field shared + unit-block."""
    model = small_data.model
    shapes, units = model.latent_shapes(), model.unit_leaves()
    shared = jax.tree.map(lambda unit: not unit, units)
    whole = hbjax.UnitBlockNormal.from_shapes(shapes, units)
    rng = np.random.default_rng(3)
    whole = jax.tree.map(lambda x: x + jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype), whole)
    units_part = hbjax.UnitBlockNormal.from_shapes(
        eqx.filter(shapes, units), eqx.filter(units, units)
    )
    units_part = eqx.tree_at(
        lambda g: (g.loc, g.raw_scale, g.unit_tril),
        units_part,
        (eqx.filter(whole.loc, units), eqx.filter(whole.raw_scale, units), whole.unit_tril),
    )
    shared_part = hbjax.MeanFieldNormal(
        loc=eqx.filter(whole.loc, shared), raw_scale=eqx.filter(whole.raw_scale, shared)
    )
    guide = ComposedGuide(
        {"shared": shared_part, "units": units_part}, {"shared": shared, "units": units}
    )
    return model, whole, guide


def test_each_part_steps_in_the_sds_of_the_guide_it_splits(pieces):
    _, whole, guide = pieces
    scales, expected = guide.step_scales(), whole.step_scales()
    for name, owns in guide.owns:
        flags = jax.tree.unflatten(jax.tree.structure(whole.loc), owns)
        for got, want in zip(
            jax.tree.leaves(scales.parts[name].loc),
            jax.tree.leaves(eqx.filter(expected.loc, flags)),
            strict=True,
        ):
            np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(scales.parts["units"].unit_tril, expected.unit_tril)


def test_parts_make_the_guide_they_split(pieces):
    model, whole, guide = pieces
    z = whole.sample(8, key=jax.random.key(0))
    terms = 4 * model.n_units
    assert_f32_close(guide.log_prob(z), whole.log_prob(z), terms=terms)
    drawn, log_q = guide.sample_and_log_prob(8, key=jax.random.key(1))
    assert_f32_close(log_q, whole.log_prob(drawn), terms=terms)
    for got, want in zip(
        jax.tree.leaves(guide.marginal_scale()), jax.tree.leaves(whole.marginal_scale())
    ):
        np.testing.assert_array_equal(got, want)
    # the exact moments through the parts' standard normals
    _, sd = linear_moments(guide, lambda z: z)
    for got, want in zip(jax.tree.leaves(sd), jax.tree.leaves(whole.marginal_scale())):
        assert_f32_close(got, want, terms=8)
    # a batch of every unit, in another order: the same density as the whole guide's
    units = jnp.asarray(np.random.default_rng(0).permutation(model.n_units), jnp.int32)
    flags = model.unit_leaves()
    taken = jax.tree.map(lambda x, unit: jnp.take(x, units, axis=-1) if unit else x, z, flags)
    assert_f32_close(guide.restrict(units, flags).log_prob(taken), whole.log_prob(z), terms=terms)


def test_every_leaf_has_one_owner(pieces):
    model, _, guide = pieces
    units = model.unit_leaves()
    with pytest.raises(ValueError, match="exactly one part"):
        ComposedGuide(guide.parts, {"shared": units, "units": units})
    with pytest.raises(ValueError, match="name other parts"):
        ComposedGuide(guide.parts, {"units": units})


@pytest.mark.usefixtures("standard_promotion")
def test_a_rate_per_part_in_a_minibatch_fit(pieces, small_data):
    """optax.multi_transform over part_labels: the shared part at rate 0 stays where it
    started, the units move, and a batch leaves the units it did not draw alone."""
    model, _, guide = pieces
    optimizer = optax.multi_transform(
        {"shared": optax.set_to_zero(), "units": optax.adam(1e-2)}, part_labels(guide)
    )
    result = hbjax.fit(
        model,
        guide,
        hbjax.Minibatches(small_data.rows, 4),
        key=jax.random.key(0),
        steps=3,
        optimizer=optimizer,
        convergence=None,
        progress=False,
    )
    fitted = result.guide.parts
    for got, start in zip(
        jax.tree.leaves(fitted["shared"]), jax.tree.leaves(guide.parts["shared"])
    ):
        np.testing.assert_array_equal(got, start)
    moved = np.asarray(fitted["units"].unit_tril != guide.parts["units"].unit_tril).any(axis=0)
    assert 0 < moved.sum() < model.n_units  # 3 batches of 4 units: some, not all


@pytest.mark.usefixtures("standard_promotion")
def test_steps_bounded_in_sds_inside_a_part_or_after_the_parts(pieces):
    """scale_by_sd in one part's chain of optax.multi_transform (the other parts masked)
    gives that part the updates it gets chained after the whole multi-transform."""
    _, _, guide = pieces
    params = eqx.filter(guide, eqx.is_inexact_array)
    grads = jax.tree.map(jnp.ones_like, params)
    unit = 10.0  # above every sd here: every mean's step shrinks
    inside = optax.multi_transform(
        {"shared": optax.sgd(1.0), "units": optax.chain(optax.sgd(1.0), scale_by_sd(unit))},
        part_labels(guide),
    )
    after = optax.chain(
        optax.multi_transform(
            {"shared": optax.sgd(1.0), "units": optax.sgd(1.0)}, part_labels(guide)
        ),
        scale_by_sd(unit),
    )
    got, _ = inside.update(grads, inside.init(params), params)
    want, _ = after.update(grads, after.init(params), params)
    for a, b in zip(
        jax.tree.leaves(got.parts["units"]), jax.tree.leaves(want.parts["units"]), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    sds = jax.tree.leaves(guide.parts["units"].marginal_scale())
    for step, sd in zip(jax.tree.leaves(got.parts["units"].loc), sds, strict=True):
        np.testing.assert_allclose(step, -sd / unit, rtol=1e-6)
