"""The one step: lazy minibatch updates, iterate averaging, and using it by hand."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tolerances import assert_f32_close

import hbjax
from hbjax.vi.step import NEVER, start_averaging

pytestmark = pytest.mark.usefixtures("standard_promotion")


def test_lazy_units_leaves_masked_entries_and_their_state_alone():
    params = {"unit": jnp.arange(6.0), "shared": jnp.ones(2)}
    grads = {"unit": jnp.linspace(-1.0, 1.0, 6), "shared": jnp.array([0.5, -0.5])}
    mask = {"unit": jnp.array([True, False, True, False, False, True]), "shared": np.True_}
    plain, lazy = optax.adam(0.1), hbjax.lazy_units(optax.adam(0.1))
    state = lazy.init(params)
    for _ in range(3):  # build up momentum everywhere first
        _, state = lazy.update(grads, state, params)
    want, want_state = plain.update(grads, state, params)
    got, got_state = lazy.update(grads, state, params, update_mask=mask)
    m = np.asarray(mask["unit"])
    np.testing.assert_array_equal(np.asarray(got["unit"])[~m], 0.0)
    np.testing.assert_array_equal(np.asarray(got["unit"])[m], np.asarray(want["unit"])[m])
    np.testing.assert_array_equal(got["shared"], want["shared"])
    mu_got, mu_old, mu_new = (s[0].mu["unit"] for s in (got_state, state, want_state))
    np.testing.assert_array_equal(np.asarray(mu_got)[~m], np.asarray(mu_old)[~m])
    np.testing.assert_array_equal(np.asarray(mu_got)[m], np.asarray(mu_new)[m])
    # without a mask it is the optimiser itself
    again, _ = lazy.update(grads, state, params)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_average_is_the_mean_of_the_iterates_since_it_began(small_data, small_model):
    panel = small_data.rows
    placed = small_data.grid(hbjax.make_mesh(1))
    guide = hbjax.make_guide("unitblock", small_model, loc=small_model.init_latents(panel))
    svi = hbjax.SVI(small_model, hbjax.vi.objectives.renyi_elbo, optax.adam(1e-2))
    step = eqx.filter_jit(svi.step)  # the README's use
    state = svi.init(guide)
    assert int(state.average_from) == NEVER and svi.guide(state) is state.guide
    key = jax.random.key(0)
    iterates = []
    for i in range(12):
        if i == 5:
            state = start_averaging(state, jnp.int32(5))
        state, info = step(state, placed, jax.random.fold_in(key, i))
        assert bool(info.finite) and np.isfinite(float(info.loss))
        if i >= 5:
            iterates.append(eqx.filter(state.guide, eqx.is_inexact_array))
    reported = eqx.filter(svi.guide(state), eqx.is_inexact_array)
    mean = jax.tree.map(lambda *xs: np.mean(np.stack(xs), axis=0), *iterates)
    for got, want in zip(jax.tree.leaves(reported), jax.tree.leaves(mean), strict=True):
        # a float32 running mean of 7 iterates vs NumPy's float32 mean: 7 roundings each
        assert_f32_close(got, want, terms=2 * 7, magnitude=np.abs(want).max() + 1e-3)
    # the iterates did move: the average is not the last iterate
    last = jax.tree.leaves(eqx.filter(state.guide, eqx.is_inexact_array))
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(reported), last, strict=True))


def test_an_optimizer_made_by_fit_decays_per_pass_over_the_data(
    small_data, small_model, monkeypatch
):
    """``fit(optimizer=make)`` calls ``make(transition_steps=...)``: 1,000 steps for a full
    batch, 1,000 times the sampler's steps per epoch for minibatches (the one place the
    decay is set: ``fit_counts`` passes its rate and preconditioning this way)."""
    made = []

    def make(transition_steps):
        made.append(transition_steps)
        return hbjax.default_optimizer(transition_steps=transition_steps)

    class Stop(Exception):
        pass

    def no_loop(svi, *args, **kwargs):
        raise Stop  # the optimiser is made; nothing needs compiling

    monkeypatch.setattr(hbjax.vi.fit, "run", no_loop)
    rows = small_data.rows
    guide = hbjax.make_guide("meanfield", small_model, loc=small_model.init_latents(rows))
    for data in (hbjax.FullBatch(rows), hbjax.Minibatches(rows, 30)):
        with pytest.raises(Stop):
            hbjax.fit(small_model, guide, data, key=jax.random.key(0), steps=10, optimizer=make)
    sampler = hbjax.Minibatches(rows, 30).sampler(small_model, 0)
    # the sampler's epoch: 30 units a step are rounded up to whole blocks (48 of 120)
    assert sampler.batch_size == 48 and sampler.steps_per_epoch == 2.5
    assert made == [1000, 2500], made
