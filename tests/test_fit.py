import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import elasticities
from tolerances import f32_rtol

import hbjax
from hbjax import MeanFieldNormal, fit

pytestmark = pytest.mark.usefixtures("standard_promotion")


def start(model, panel):
    return MeanFieldNormal.from_shapes(model.latent_shapes(), loc=model.init_latents(panel))


def test_step_traces_once_across_chunks_and_remainder(small_data, small_model):
    panel = small_data.rows
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


def test_result_does_not_depend_on_chunk_size(small_data, small_model):
    panel = small_data.rows
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
    rtol = f32_rtol(terms=len(panel.unit))
    np.testing.assert_allclose(runs[0].losses, runs[1].losses, rtol=rtol)
    # Adam's step is normalised, so a relative rounding of the gradient moves a parameter by
    # at most that fraction of the learning rate each step (30 steps, lr 0.01)
    for a, b in zip(jax.tree.leaves(runs[0].guide), jax.tree.leaves(runs[1].guide), strict=True):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=30 * 0.01 * rtol)


def test_loss_decreases_and_custom_objective_and_optimizer_plug_in(small_data, small_model):
    panel = small_data.rows
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


def test_non_finite_loss_names_the_step_and_keeps_last_good_state(small_data, small_model):
    panel = small_data.rows

    def poison_at_step(step):
        def update(updates, state, params=None):
            count = state
            factor = jnp.where(count == step, jnp.nan, 1.0)
            return jax.tree.map(lambda u: u * factor, updates), count + 1

        return optax.chain(
            optax.adam(1e-3), optax.GradientTransformation(lambda p: jnp.int32(0), update)
        )

    guide = start(small_model, panel)
    options = {"key": jax.random.key(3), "chunk_size": 4, "progress": False}
    with pytest.raises(hbjax.NonFiniteLossError, match="step 6") as info:
        fit(small_model, guide, panel, steps=20, optimizer=poison_at_step(6), **options)
    error = info.value
    assert error.step == 6 and error.result.steps == 6 and len(error.result.losses) == 6
    assert "learning rate" in str(error)
    # the guide after the 6 good steps, exactly: step 6 fell in the chunk of steps 4-7,
    # which the loop ran again up to it
    with pytest.warns(hbjax.ConvergenceWarning):
        six = fit(small_model, guide, panel, steps=6, optimizer=poison_at_step(-1), **options)
    np.testing.assert_array_equal(error.result.losses, six.losses)
    for bad, good in zip(
        jax.tree.leaves(error.result.guide), jax.tree.leaves(six.guide), strict=True
    ):
        np.testing.assert_array_equal(bad, good)


def test_fit_validates_arguments(small_sim, small_data, small_model):
    panel = small_data.rows
    guide = start(small_model, panel)
    with pytest.raises(ValueError, match="steps"):
        fit(small_model, guide, panel, key=jax.random.key(0), steps=0, progress=False)
    frame = small_sim.frame
    fewer = frame[frame["product"].isin(frame["product"].unique()[:30])]
    other = hbjax.counts.elasticity_data(fewer).model
    with pytest.raises(ValueError, match="does not match"):
        fit(other, guide, panel, key=jax.random.key(0), steps=1, progress=False)
    unchecked = getattr(fit, "__wrapped__", fit)
    with pytest.raises(TypeError, match="from_frame"):
        unchecked(small_model, guide, "data.csv", key=jax.random.key(0), steps=1)


def test_data_sources_are_checked_when_built(small_data, small_model):
    rows, mesh = small_data.rows, hbjax.make_mesh(2)
    with pytest.raises(TypeError, match="the data must be hbjax.UnitRows"):
        hbjax.FullBatch("data.csv")
    with pytest.raises(TypeError, match="splits host hbjax.UnitRows"):
        hbjax.FullBatch({"y": np.zeros(3)}, mesh)
    placed = hbjax.shard_rows(rows, mesh)
    with pytest.raises(TypeError, match="splits host hbjax.UnitRows"):
        hbjax.FullBatch(placed, mesh)  # already placed: it keeps its own mesh
    kept, on = hbjax.FullBatch(placed).place()
    assert kept is placed and on is mesh
    grid = small_data.grid(mesh)
    kept, on = hbjax.FullBatch(grid).place()
    assert kept is grid and on is mesh
    with pytest.raises(TypeError, match="the full data stays on the host"):
        hbjax.Minibatches(placed, 8)
    with pytest.raises(ValueError, match="needs batch_size"):
        hbjax.Minibatches(rows)
    sampler = rows.sampler(8, mesh, seed=0)
    with pytest.raises(ValueError, match="brings its own batch size"):
        hbjax.Minibatches(sampler, 8)
    with pytest.raises(ValueError, match="not smaller than the number of units"):
        hbjax.Minibatches(rows, rows.n_units).sampler(small_model, seed=0)
    too_many = hbjax.counts.FitConfig(batch_size=rows.n_units, progress=False)
    with pytest.raises(ValueError, match="not smaller than the number of units"):
        hbjax.counts.fit_counts(small_data, too_many)  # the sampler's own check
    low_rank = hbjax.make_guide("lowrank", small_model, key=jax.random.key(0))
    with pytest.raises(TypeError, match="cannot be minibatched"):
        fit(small_model, low_rank, hbjax.Minibatches(rows, 8), key=jax.random.key(0), steps=1)
    unchecked = getattr(fit, "__wrapped__", fit)  # past the type hints' run-time check
    with pytest.raises(TypeError, match="hbjax.Checkpoints"):
        unchecked(small_model, low_rank, rows, key=jax.random.key(0), steps=1, checkpoints="ckpt")


def test_recovery_beats_pooling_and_approaches_the_information_bound(recovery_fit):
    sim, data, result = recovery_fit
    units = data.summary(result.guide)["log_price/unit"].reset_index(names="product")
    units = units.merge(sim.truth, on="product")
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


def test_loop_moves_nothing_from_host_to_device(small_data, small_model, monkeypatch):
    # fit places the rows once, before the loop; the loop runs under a transfer guard.
    # Were the rows left on the host, every chunk would copy them up, and the guard says so.
    panel = small_data.rows
    guide = start(small_model, panel)
    left_on_host = lambda data, mesh: (data, hbjax.make_mesh(1))  # noqa: E731
    monkeypatch.setattr(hbjax.UnitRows, "place", left_on_host)
    with pytest.raises(Exception, match="host-to-device transfer"):
        fit(small_model, guide, panel, key=jax.random.key(0), steps=3, progress=False)


def test_layout_does_not_change_the_fit(small_data, small_model):
    panel = small_data.rows
    means, sds = {}, {}
    start_at = small_model.init_latents(panel)
    for layout, placed in (("rows", panel), ("dense", small_data.grid(hbjax.make_mesh(1)))):
        guide = MeanFieldNormal.from_shapes(small_model.latent_shapes(), loc=start_at)
        result = fit(small_model, guide, placed, key=jax.random.key(5), steps=300, progress=False)
        means[layout] = np.asarray(elasticities(small_model, result.guide.loc))
        sds[layout] = small_data.summary(result.guide)["log_price/unit"]["sd"].to_numpy()
    # Per step the layouts differ by float rounding only (~1e-7 of elasticities ~2); Adam's
    # per-coordinate normalisation amplifies it where a gradient is near zero (any change
    # of summation order moves some units by ~1% of their sd after 300 steps), so allow
    # 3% of each unit's posterior sd; a wrong kernel moves them by tens of percent.
    moved = np.abs(means["dense"] - means["rows"]) / sds["rows"]
    assert moved.max() < 0.03, moved.max()
    assert np.median(moved) < 0.005, np.median(moved)


def test_a_clipped_model_gets_the_row_layout(small_sim):
    clipped = hbjax.counts.elasticity_data(small_sim.frame, clip_log_rate=(-4.0, 20.0))
    with pytest.raises(hbjax.counts.GridError, match="clipped"):
        clipped.grid(hbjax.make_mesh(1))
    config = hbjax.counts.FitConfig(steps=20, progress=False)
    result = hbjax.counts.fit_counts(clipped, config, mesh=hbjax.make_mesh(1))
    assert np.all(np.isfinite(result.losses))


def test_callback_sees_each_chunk_and_may_use_jax(small_data, small_model):
    panel = small_data.rows
    seen = []

    def callback(step, guide):  # noqa: ANN001, ANN202
        # the user's code may compute with JAX (here: natural values, via the model's arrays)
        beta = elasticities(small_model, jax.tree.map(jnp.asarray, guide.loc))
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
    final = float(jnp.mean(elasticities(small_model, result.guide.loc)))
    # a float32 mean over the units, on device vs here: n_units roundings of terms up to
    # the largest elasticity in size
    values = np.asarray(elasticities(small_model, result.guide.loc))
    rel = f32_rtol(terms=len(values), condition=np.abs(values).max() / abs(final))
    assert seen[-1][1] == pytest.approx(final, rel=rel)


def test_a_scheduled_alpha_ends_where_the_fixed_alpha_ends(small_data, small_model):
    """Alpha from 1 (the ELBO) to 0 over 500 steps, then 0: the converged fit is the fixed
    alpha-0 fit's. Each average's Monte Carlo error is about 0.02 sd (median; the stop's
    target), so two independent ones differ by about 0.02 sd (median; seeds 0-2 gave
    0.013-0.017 and at most 0.066)."""
    guide = hbjax.make_guide(
        "unitblock", small_model, loc=small_model.init_latents(small_data.rows)
    )
    fixed = hbjax.RenyiBound(alpha=0.0, gradient="total")
    scheduled = hbjax.RenyiBound(alpha=optax.linear_schedule(1.0, 0.0, 500), schedule_end=500)
    tables = []
    for objective in (fixed, scheduled):
        result = fit(
            small_model, guide, small_data.rows, key=jax.random.key(1), steps=8000,
            objective=objective, progress=False,
        )  # fmt: skip
        assert result.converged and result.convergence.average_from >= objective.settled_at
        tables.append(small_data.summary(result.guide)["log_price/unit"])
    gap = np.abs(tables[0]["mean"] - tables[1]["mean"]) / tables[0]["sd"]
    assert np.median(gap) < 0.06 and gap.max() < 0.25, (np.median(gap), gap.max())
    np.testing.assert_allclose(np.median(tables[1]["sd"] / tables[0]["sd"]), 1.0, atol=0.03)


def test_a_schedule_holds_averaging_back_and_resumes_bit_for_bit(small_data, small_model, tmp_path):
    """A convergence rule that would average from its first check (40 steps) waits for the
    schedule's end and judges iterates from there on; a fit cut mid-schedule and resumed
    equals the uninterrupted one."""
    panel = small_data.rows
    guide = hbjax.make_guide("unitblock", small_model, loc=small_model.init_latents(panel))
    objective = hbjax.RenyiBound(alpha=optax.linear_schedule(1.0, 0.0, 100), schedule_end=100)
    quick = hbjax.vi.convergence.Convergence(rhat=100.0, mcse=10.0, check_every=20, min_average=40)
    options = {"key": jax.random.key(3), "progress": False, "objective": objective}
    options |= {"convergence": quick, "chunk_size": 20}
    whole = fit(small_model, guide, panel, steps=200, **options)
    # the first check with 40 iterates from step 100 on (unscheduled: step 40)
    assert whole.convergence.average_from == 140 and whole.converged
    folder = tmp_path / "ckpt"
    first = fit(
        small_model,
        guide,
        panel,
        steps=60,
        checkpoints=hbjax.Checkpoints(folder, every=20),
        **options,
    )
    assert first.steps == 60 and first.convergence.average_from is None
    resume = hbjax.Checkpoints(folder, every=20, resume=True)
    resumed = fit(small_model, guide, panel, steps=200, checkpoints=resume, **options)
    np.testing.assert_array_equal(resumed.losses, whole.losses)  # the same program, bit for bit
    for a, b in zip(jax.tree.leaves(resumed.guide), jax.tree.leaves(whole.guide), strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_readme_step_recipe_compiles_once(small_data, small_model):
    """``svi.init(guide, mesh)`` places the state as the step returns it: a jitted step
    traces once over several calls (with unplaced arrays the second call traced again)."""
    guide = hbjax.make_guide(
        "unitblock", small_model, loc=small_model.init_latents(small_data.rows)
    )
    svi = hbjax.SVI(small_model, hbjax.RenyiBound(num_particles=2), optax.adam(1e-2))
    traces = 0

    def step(state, batch, key):
        nonlocal traces
        traces += 1
        return svi.step(state, batch, key)

    jitted = eqx.filter_jit(step)
    for mesh in (hbjax.make_mesh(2), None):
        traces = 0
        placed = small_data.grid(mesh or hbjax.make_mesh(1))
        state = svi.init(guide, mesh)
        for i in range(3):
            state, info = jitted(state, placed, jax.random.key(i))
        assert traces == 1 and bool(info.finite)
