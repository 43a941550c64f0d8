"""The per-unit guide checks: block moments, each unit's own log-joint terms, verdicts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hbjax
from hbjax.vi.checks import nuts_check, unit_block_moments, unit_importance

pytestmark = pytest.mark.usefixtures("standard_promotion")


def small_data(n_units=12, n_periods=10, seed=0, **options):
    sim = hbjax.simulate(n_units=n_units, n_periods=n_periods, n_groups=3, seed=seed)
    return hbjax.counts.elasticity_data(sim.frame, **options)


def perturbed(guide, key):
    """The guide with every array moved at random (correlations and scales not trivial)."""
    leaves, treedef = jax.tree.flatten(guide)
    keys = jax.random.split(key, len(leaves))
    moved = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, moved)


@pytest.mark.parametrize("kind", ["meanfield", "unitblock", "lowrank"])
def test_block_moments_are_the_guides_covariance(kind):
    model = small_data().model
    guide = perturbed(hbjax.make_guide(kind, model, rank=3), jax.random.key(1))
    flags = jax.tree.leaves(model.unit_leaves())
    latent = [i for i, flag in enumerate(flags) if flag]
    units = np.array([0, 3, 7, 11])
    mean, cov = unit_block_moments(guide, latent, units)
    # the reference: the guide's own dense covariance, each kind its own way
    if kind == "lowrank":
        sizes = np.cumsum([0] + [x.size for x in jax.tree.leaves(guide.loc)])
        full = np.asarray(guide.covariance())
        expected = np.stack(
            [full[np.ix_(idx, idx)] for idx in ([sizes[i] + u for i in latent] for u in units)]
        )
    elif kind == "unitblock":
        expected = np.asarray(guide.unit_covariance())[units]
    else:
        scales = jax.tree.leaves(guide.scale)
        expected = np.stack([np.diag([float(scales[i][u]) ** 2 for i in latent]) for u in units])
    np.testing.assert_allclose(cov, expected, rtol=1e-4, atol=1e-7)
    loc = jax.tree.leaves(guide.loc)
    np.testing.assert_allclose(mean, np.stack([np.asarray(loc[i])[units] for i in latent], 1))


@pytest.mark.parametrize("hierarchy", ["centred", "noncentred"])
def test_slot_terms_are_the_units_share_of_the_log_joint(hierarchy):
    """log_joint - sum of every unit's slot terms depends on the shared latents only."""
    data = small_data(hierarchy=hierarchy)
    model, panel = data.model, data.rows
    batch = panel.unit_batch(np.arange(model.n_units))
    base = hbjax.MeanFieldNormal.from_shapes(model.latent_shapes()).sample(2, key=jax.random.key(0))
    latents = [jax.tree.map(lambda x, i=i: x[i], base) for i in range(2)]
    # the second set: the first one's shared latents, other unit latents
    mixed = jax.tree.map(
        lambda a, b, unit: b if unit else a, latents[0], latents[1], model.unit_leaves()
    )
    rest = [
        float(model.log_joint(z, panel)) - float(jnp.sum(model.slot_log_joint(z, batch)))
        for z in (latents[0], mixed)
    ]
    assert rest[0] == pytest.approx(rest[1], rel=1e-5, abs=1e-2)
    slot = model.slot_log_joint(mixed, batch)
    moved = float(model.log_joint(mixed, panel)) - float(model.log_joint(latents[0], panel))
    # what changed between the two sets is the units' latents: their slot terms say by how much
    expected = float(jnp.sum(slot - model.slot_log_joint(latents[0], batch)))
    assert moved == pytest.approx(expected, rel=1e-4)


def test_unit_batch_holds_each_units_rows():
    rows = small_data().rows
    units = np.array([2, 5, 9])
    batch = rows.unit_batch(units)
    unit_of_row, slot_of_row = np.asarray(rows.unit), np.asarray(batch.rows.unit)
    np.testing.assert_array_equal(np.asarray(batch.unit), units)
    for slot, unit in enumerate(units):
        mine = slot_of_row == slot
        for name in ("counts", "log_factorial"):
            np.testing.assert_array_equal(
                np.asarray(batch.rows.columns[name])[mine],
                np.asarray(rows.columns[name])[unit_of_row == unit],
            )
    assert len(slot_of_row) == np.isin(unit_of_row, units).sum()


@pytest.fixture(scope="module")
def good_and_bad_fits():
    """A converged unit-block fit with price centring, and mean-field on raw log prices."""
    sim = hbjax.simulate(n_units=100, n_periods=52, n_groups=5, seed=3)
    fits = {}
    for name, centre, kind, steps in (
        ("good", True, "unitblock", 20_000),
        ("bad", False, "meanfield", 2000),
    ):
        data = hbjax.counts.elasticity_data(sim.frame, centre=centre)
        model, panel = data.model, data.rows
        guide = hbjax.make_guide(kind, model, loc=model.init_latents(panel))
        with jax.numpy_dtype_promotion("standard"):  # optax's Adam (see conftest.py)
            fits[name] = hbjax.fit(
                model,
                guide,
                panel,
                key=jax.random.key(0),
                steps=steps,
                progress=False,
                convergence=hbjax.vi.convergence.Convergence() if name == "good" else None,
            )
    return panel, fits


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unit_importance_tells_a_good_fit_from_a_bad_one(good_and_bad_fits, seed):
    panel, fits = good_and_bad_fits
    checks = {
        name: unit_importance(r.model, r.guide, panel, key=jax.random.key(seed))
        for name, r in fits.items()
    }
    # measured over keys 0-4: good 0-3% of units at k >= 0.7, bad 55-70%
    assert checks["good"].share_poor <= 0.05 and checks["good"].verdict.startswith("good")
    assert checks["bad"].share_poor >= 0.3 and checks["bad"].verdict.startswith("poor")
    # the advice names the guide to try only to a fit that does not use it
    assert "try the unit-block guide" in checks["bad"].verdict
    assert "unit-block" not in checks["good"].advice
    worst = checks["bad"].worst(5)
    k_of = dict(zip(checks["bad"].units, checks["bad"].k_hat, strict=True))
    assert [k_of[u] for u in worst] == sorted(checks["bad"].k_hat, reverse=True)[:5]


def test_nuts_check_tells_a_good_fit_from_a_bad_one(good_and_bad_fits):
    panel, fits = good_and_bad_fits
    checks = {
        name: nuts_check(
            r.model, r.guide, panel, key=jax.random.key(0), num_units=15, warmup=200, draws=200
        )
        for name, r in fits.items()
    }
    good, bad = checks["good"], checks["bad"]
    price = good.table[good.table["leaf"] == "slopes['log_price']['unit']"]
    assert price["unit"].nunique() == 15
    # measured: good sd ratio 0.97-1.00 and coverage 100%; bad 0.07-0.08 and 33-35%
    assert 0.85 <= good.sd_ratio <= 1.15 and good.coverage >= 0.9 and good.good
    assert bad.sd_ratio <= 0.3 and bad.coverage <= 0.7 and not bad.good
    assert good.verdict.startswith("good") and bad.verdict.startswith("poor")


def test_checks_refuse_what_they_cannot_check(good_and_bad_fits):
    panel, fits = good_and_bad_fits
    result = fits["good"]
    placed = hbjax.shard_rows(panel, hbjax.make_mesh(1))
    with pytest.raises(TypeError, match="take host data"):
        unit_importance(result.model, result.guide, placed, key=jax.random.key(0))
    with pytest.raises(ValueError, match="num_draws"):
        unit_importance(result.model, result.guide, panel, key=jax.random.key(0), num_draws=10)
    with pytest.raises(ValueError, match="num_units"):
        nuts_check(result.model, result.guide, panel, key=jax.random.key(0), num_units=0)
