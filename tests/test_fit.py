import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tolerances import assert_f32_close, f32_rtol

import hbjax
from hbjax import MeanFieldNormal, fit

pytestmark = pytest.mark.usefixtures("standard_promotion")


def start(model, panel):
    return MeanFieldNormal.from_shapes(model.latent_shapes(), loc=model.init_latents(panel))


def test_step_traces_once_across_chunks_and_remainder(small_panel, small_model):
    panel, _ = small_panel
    result = fit(
        small_model,
        start(small_model, panel),
        panel,
        key=jax.random.key(0),
        steps=25,
        chunk_size=10,
        progress=False,
    )
    assert result.num_traces == 1
    assert result.steps == 25 and result.losses.shape == (25,)
    assert np.all(np.isfinite(result.losses))


def test_result_does_not_depend_on_chunk_size(small_panel, small_model):
    panel, _ = small_panel
    runs = [
        fit(
            small_model,
            start(small_model, panel),
            panel,
            key=jax.random.key(1),
            steps=30,
            chunk_size=c,
            progress=False,
        )
        for c in (30, 7)
    ]
    # the same steps and keys; only the compiled program (scan length) differs, and with it
    # the order of float32 sums over the rows: each loss is a sum of n_rows terms
    rtol = f32_rtol(terms=panel.n_rows)
    np.testing.assert_allclose(runs[0].losses, runs[1].losses, rtol=rtol)
    # Adam's step is normalised, so a relative rounding of the gradient moves a parameter by
    # at most that fraction of the learning rate each step (30 steps, lr 0.01)
    for a, b in zip(jax.tree.leaves(runs[0].guide), jax.tree.leaves(runs[1].guide), strict=True):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=30 * 0.01 * rtol)


def test_loss_decreases_and_custom_objective_and_optimizer_plug_in(small_panel, small_model):
    panel, _ = small_panel
    objective = functools.partial(hbjax.elbo, num_particles=2)
    result = fit(
        small_model,
        start(small_model, panel),
        panel,
        key=jax.random.key(2),
        steps=300,
        optimizer=optax.adam(0.02),
        objective=objective,
        progress=False,
    )
    first, last = result.losses[:20].mean(), result.losses[-20:].mean()
    assert last < first - 0.01 * abs(first)
    assert result.iterations_per_second > 0 and result.compile_seconds > 0


def test_non_finite_loss_names_the_step_and_keeps_last_good_state(small_panel, small_model):
    panel, _ = small_panel

    def poison_at_step(step):
        def update(updates, state, params=None):
            count = state
            factor = jnp.where(count == step, jnp.nan, 1.0)
            return jax.tree.map(lambda u: u * factor, updates), count + 1

        return optax.chain(
            optax.adam(1e-3), optax.GradientTransformation(lambda p: jnp.int32(0), update)
        )

    guide = start(small_model, panel)
    with pytest.raises(hbjax.NonFiniteLossError, match="step 6") as info:
        fit(
            small_model,
            guide,
            panel,
            key=jax.random.key(3),
            steps=20,
            chunk_size=4,
            optimizer=poison_at_step(6),
            progress=False,
        )
    error = info.value
    assert error.step == 6 and error.result.steps == 6 and len(error.result.losses) == 6
    for leaf in jax.tree.leaves(error.result.guide):
        assert np.all(np.isfinite(np.asarray(leaf)))
    assert "learning rate" in str(error)


def test_fit_validates_arguments(small_panel, small_model):
    panel, _ = small_panel
    guide = start(small_model, panel)
    with pytest.raises(ValueError, match="steps"):
        fit(small_model, guide, panel, key=jax.random.key(0), steps=0, progress=False)
    other = hbjax.ElasticityModel(np.zeros(3, np.int32), 1, 2)
    with pytest.raises(ValueError, match="does not match"):
        fit(other, guide, panel, key=jax.random.key(0), steps=1, progress=False)
    unchecked = getattr(fit, "__wrapped__", fit)
    with pytest.raises(TypeError, match="from_frame"):
        unchecked(small_model, guide, "data.csv", key=jax.random.key(0), steps=1)


def test_recovery_beats_pooling_and_approaches_the_information_bound(recovery_fit):
    sim, panel, encoding, result = recovery_fit
    summary = hbjax.summarize(result, encoding, num_samples=200)
    units = summary.units.merge(sim.truth, on=["product", "category"])
    rmse = float(np.sqrt(np.mean((units["mean"] - units["elasticity"]) ** 2)))
    # Complete pooling (one elasticity for all) errs by the spread of the truth.
    pooled = float(np.sqrt(np.mean((units["elasticity"] - units["elasticity"].mean()) ** 2)))
    # Information bound: with the true intercepts and time effects known, beta_i's posterior
    # variance is 1 / (Fisher information + prior precision), the Fisher information being
    # sum_t mu_it (log p_it - mean_t log p_it)^2 (the intercept absorbs the mean log price).
    frame = sim.frame.merge(sim.truth, on=["product", "category"])
    log_p = np.log(frame["price"].to_numpy())
    centred = log_p - frame.groupby("product")["price"].transform(lambda p: np.log(p).mean())
    mu = frame["units_sold"].to_numpy() + 0.5  # ~ the Poisson mean, per row
    info = (mu * centred**2).groupby(frame["product"]).sum()
    oracle = float(np.sqrt(np.mean(1 / (info.to_numpy() + 1 / 2.0**2))))
    print(f"rmse {rmse:.3f} pooled {pooled:.3f} oracle {oracle:.3f}")
    assert rmse < 0.75 * pooled
    # The posterior mean cannot beat the oracle by much (sampling error of an RMSE over 300
    # units is ~4%); SVI with unknown nuisance effects may lose up to 50% to it.
    assert 0.85 * oracle < rmse < 1.5 * oracle


def test_loop_moves_nothing_from_host_to_device(small_panel, small_model, monkeypatch):
    # fit places the panel once, before the loop; the loop runs under a transfer guard.
    # Were the panel left on the host, every chunk would copy it up, and the guard says so.
    panel, _ = small_panel
    guide = start(small_model, panel)
    left_on_host = lambda data, mesh, layout: (data, hbjax.make_mesh(1))  # noqa: E731
    monkeypatch.setattr(hbjax.Panel, "place", left_on_host)
    with pytest.raises(Exception, match="host-to-device transfer"):
        fit(small_model, guide, panel, key=jax.random.key(0), steps=3, progress=False)


def test_layout_does_not_change_the_fit(small_panel, small_model):
    panel, encoding = small_panel
    means, starts, sds = {}, {}, {}
    for layout in ("rows", "dense"):
        placed = hbjax.shard_panel(panel, hbjax.make_mesh(1), layout=layout)
        starts[layout] = small_model.init_latents(placed)
        guide = MeanFieldNormal.from_shapes(small_model.latent_shapes(), loc=starts[layout])
        result = fit(small_model, guide, placed, key=jax.random.key(5), steps=300, progress=False)
        means[layout] = np.asarray(small_model.natural(result.guide.loc).unit_elasticity)
        sds[layout] = hbjax.summarize(result, encoding, num_samples=200).units["sd"].to_numpy()
    # the data-informed start is the same from either layout, and from the host panel
    # per-unit sums over its rows in another order: float32 rounding of n_periods terms
    for a, b in zip(jax.tree.leaves(starts["rows"]), jax.tree.leaves(starts["dense"]), strict=True):
        assert_f32_close(a, b, terms=panel.n_periods, magnitude=np.abs(b).max() + 1)
    host = small_model.init_latents(panel)
    np.testing.assert_array_equal(host.unit_effect, small_model.init_latents(panel).unit_effect)
    # Per step the layouts differ by float rounding only (~1e-7 of elasticities ~2); Adam's
    # per-coordinate normalisation amplifies it where a gradient is near zero (any change
    # of summation order moves some units by ~1% of their sd after 300 steps), so allow
    # 3% of each unit's posterior sd; a wrong kernel moves them by tens of percent.
    moved = np.abs(means["dense"] - means["rows"]) / sds["rows"]
    assert moved.max() < 0.03, moved.max()
    assert np.median(moved) < 0.005, np.median(moved)


def test_a_clipped_model_gets_the_row_layout(small_panel):
    panel, _ = small_panel
    clipped = hbjax.ElasticityModel.from_panel(panel, clip_log_rate=(-4.0, 20.0))
    assert clipped.panel_layout().name == "rows"
    result = fit(
        clipped, start(clipped, panel), panel, key=jax.random.key(0), steps=20, progress=False
    )
    assert np.all(np.isfinite(result.losses))


def test_callback_sees_each_chunk_and_may_use_jax(small_panel, small_model):
    panel, _ = small_panel
    seen = []

    def callback(step, guide):  # noqa: ANN001, ANN202
        # the user's code may compute with JAX (here: natural values, via the model's arrays)
        beta = small_model.natural(guide.loc).unit_elasticity
        seen.append((step, float(jnp.mean(beta))))

    result = fit(
        small_model,
        start(small_model, panel),
        panel,
        key=jax.random.key(0),
        steps=25,
        chunk_size=10,
        progress=False,
        callback=callback,
    )
    assert [s for s, _ in seen] == [10, 20, 25]
    final = float(jnp.mean(small_model.natural(result.guide.loc).unit_elasticity))
    # a float32 mean over the units, on device vs here: n_units roundings of terms up to
    # the largest elasticity in size
    values = np.asarray(small_model.natural(result.guide.loc).unit_elasticity)
    rel = f32_rtol(terms=len(values), condition=np.abs(values).max() / abs(final))
    assert seen[-1][1] == pytest.approx(final, rel=rel)
