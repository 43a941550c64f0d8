"""A vocabulary fit's outputs: saved fits, what-if predictions, ArviZ export."""

import json
import warnings

import equinox as eqx
import jax
import numpy as np
import pandas as pd
import pytest
from tolerances import f32_atol

import hbjax
from hbjax import ConvergenceWarning
from hbjax.counts import Effect, Slope, from_frame, load_fit, predict, save_fit, to_arviz


def _table(seed: int = 0, n_units: int = 24, n_weeks: int = 6) -> pd.DataFrame:
    """Products in subcategories in categories, with stores, prices, promotions, exposure."""
    rng = np.random.default_rng(seed)
    unit = np.repeat(np.arange(n_units), n_weeks)
    sub = unit % 4
    return pd.DataFrame(
        {
            "sku": [f"p{u:02d}" for u in unit],
            "sub": [f"s{s}" for s in sub],
            "cat": [f"c{s % 2}" for s in sub],
            "store": rng.integers(0, 3, len(unit)),
            "week": np.tile(np.arange(n_weeks), n_units) + 10,
            "price": rng.uniform(1.0, 3.0, len(unit)),
            "promo": (rng.random(len(unit)) < 0.3).astype(float),
            "exposure": rng.uniform(0.0, 0.5, len(unit)),
            "qty": rng.poisson(6.0, len(unit)) * (rng.random(len(unit)) < 0.8),
        }
    )


@pytest.fixture(scope="module")
def everything():
    """A model with every term (all kinds of labels) and a low-rank fit of it."""
    frame = _table()
    data = from_frame(
        frame,
        unit="sku",
        counts="qty",
        groups=("sub", "cat"),
        slopes=[
            Slope("price", log=True, over=("unit", "sub", "cat"), prior=(-2.0, 1.0)),
            Slope("promo", over=("cat",)),
        ],
        effects=[Effect(("cat", "week")), Effect(("store",), scale=0.5)],
        offset="exposure",
        period="week",
        likelihood="negbin",
        dispersion_by="cat",
        zero_inflation=True,
    )
    config = hbjax.counts.FitConfig(steps=150, progress=False, guide="lowrank", rank=3)
    # optax needs standard promotion (conftest.standard_promotion; this fixture is per module)
    with pytest.warns(ConvergenceWarning), jax.numpy_dtype_promotion("standard"):
        result = hbjax.counts.fit_counts(data, config)
    return frame, data, result


def test_a_saved_fit_reads_back_the_same_model_guide_and_labels(everything, tmp_path):
    frame, data, result = everything
    save_fit(data, result, tmp_path / "fit")
    saved = load_fit(tmp_path / "fit")
    for a, b in [(result.model, saved.data.model), (result.guide, saved.guide)]:
        left, right = eqx.filter(a, eqx.is_array), eqx.filter(b, eqx.is_array)
        assert jax.tree.structure(left) == jax.tree.structure(right)
        for x, y in zip(jax.tree.leaves(left), jax.tree.leaves(right), strict=True):
            np.testing.assert_array_equal(x, y)
    assert saved.data.spec == data.spec
    for name in ("units", "periods"):
        assert getattr(saved.data, name).equals(getattr(data, name))
        assert getattr(saved.data, name).name == getattr(data, name).name
    for labels, original in [(saved.data.levels, data.levels), (saved.data.cells, data.cells)]:
        assert labels.keys() == original.keys()
        for key in labels:
            assert labels[key].equals(original[key]) and labels[key].names == original[key].names
    assert saved.data.cells["cat:week"].get_level_values("week").dtype.kind == "i"
    ours, theirs = data.summary(result.guide), saved.data.summary(saved.guide)
    assert ours.keys() == theirs.keys()
    for name in ours:
        pd.testing.assert_frame_equal(ours[name], theirs[name])
    assert saved.info["steps"] == result.steps
    with pytest.raises(ValueError, match="holds no rows"):
        hbjax.counts.fit_counts(saved.data)


def test_a_folder_without_a_vocabulary_fit_is_one_clear_line(everything, tmp_path):
    _, data, result = everything
    with pytest.raises(hbjax.DataValidationError, match="holds no saved fit"):
        load_fit(tmp_path)
    save_fit(data, result, tmp_path / "fit")
    info = json.loads((tmp_path / "fit" / "fit.json").read_text())
    old = tmp_path / "old"
    old.mkdir()
    (old / "fit.json").write_text(json.dumps({**info, "format": "hbjax-fit-1"}))
    with pytest.raises(hbjax.DataValidationError, match="former own stack.*fit the table again"):
        load_fit(old)
    (tmp_path / "fit" / "fit.eqx").write_bytes(b"truncated")
    with pytest.raises(hbjax.DataValidationError, match="damaged saved fit"):
        load_fit(tmp_path / "fit")


def _by_hand(data, guide, scenarios, key, n, weeks=None):
    """``E[qty]`` per draw from the natural values, written out term by term."""
    z = data.natural_draws(guide, n, key)
    unit = data.units.get_indexer(scenarios["sku"])
    cat = data.levels["cat"].get_indexer(scenarios["cat"])
    store = data.cells["store"].get_indexer(scenarios["store"])
    cells = data.cells["cat:week"]
    if weeks is None:
        week = cells.get_indexer(pd.MultiIndex.from_arrays([scenarios["cat"], scenarios["week"]]))
        week_effect = z.effects["cat:week"][:, week]
    else:  # the mean over each category's fitted weeks
        of_cat = cells.get_level_values("cat")
        week_effect = np.stack(
            [z.effects["cat:week"][:, of_cat == c].mean(axis=1) for c in scenarios["cat"]], axis=1
        )
    log_rate = (
        z.intercept[:, unit]
        + z.slopes["log_price"]["unit"][:, unit] * np.log(scenarios["price"].to_numpy())
        + z.slopes["promo"]["cat"][:, cat] * scenarios["promo"].to_numpy()
        + week_effect
        + z.effects["store"][:, store]
        + scenarios["exposure"].to_numpy()
    )
    return (1 - z.zero_inflation[:, None]) * np.exp(log_rate)


def test_predict_is_the_models_expected_count_at_new_values(everything):
    """What-ifs at prices and promotions the table never had: the posterior mean and
    interval of ``(1 - pi) exp(d_i + b_i log p + lift_cat promo + g_cat,week + g_store +
    offset)`` over the same draws, term by term; without the week, the mean of the
    category's fitted weeks."""
    frame, data, result = everything
    scenarios = pd.DataFrame(
        {
            "sku": ["p03", "p03", "p10", "p17"],
            "price": [0.5, 4.0, 2.0, 1.2],
            "promo": [0.0, 1.0, 1.0, 0.0],
            "week": [10, 15, 12, 13],
            "store": [0, 2, 1, 0],
            "exposure": [0.0, 0.2, 0.1, 0.4],
            "note": ["a", "b", "c", "d"],
        }
    )
    scenarios["cat"] = data.levels["cat"][
        np.asarray(data.model.table.levels["cat"])[data.units.get_indexer(scenarios["sku"])]
    ]
    key, n = jax.random.key(4), 400
    for weeks in (None, "averaged"):
        given = scenarios if weeks is None else scenarios.drop(columns="week")
        out = predict(data, result.guide, given, num_samples=n, key=key, interval=0.8)
        expected = _by_hand(data, result.guide, scenarios, key, n, weeks)
        # exp of a float32 sum of ~8 terms: relative error = the sum's absolute rounding
        rtol = f32_atol(terms=16, magnitude=np.abs(np.log(expected)).max() + 5)
        np.testing.assert_allclose(out["expected_units"], expected.mean(axis=0), rtol=rtol)
        low, high = np.quantile(expected, [0.1, 0.9], axis=0)
        np.testing.assert_allclose(out["expected_units_lo"], low, rtol=rtol)
        np.testing.assert_allclose(out["expected_units_hi"], high, rtol=rtol)
        assert list(out["note"]) == ["a", "b", "c", "d"]


def test_predict_warns_at_prices_far_from_each_units_typical_price(everything):
    _, data, result = everything
    typical = np.exp(np.asarray(data.model.table.centre["log_price"], np.float64))
    scenarios = pd.DataFrame(
        {"sku": data.units[:4], "price": typical[:4] * [1.0, 2.9, 1 / 2.9, 3.2]}
    ).assign(promo=0.0, week=10, store=1, exposure=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hbjax.DataWarning)  # within 3x: no warning
        predict(data, result.guide, scenarios[:3], num_samples=5)
    with pytest.warns(
        hbjax.DataWarning, match=r"price more than 3x .* in 1 row\(s\), first at index 3"
    ):
        out = predict(data, result.guide, scenarios, num_samples=5)
    assert len(out) == 4  # still answered


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.drop(columns="promo"), r"need columns \['promo'\]"),
        (lambda s: s.assign(sku="nope"), "units the fit has not seen.*'nope'"),
        (lambda s: s.assign(week=99), "effect 'cat:week'.*cells the fit has not seen"),
        (lambda s: s.assign(cat="c1"), "column 'cat' says 'c1' for unit 'p00'.*'c0'"),
        (lambda s: s.assign(price=-1.0), "'price' must be > 0"),
        (lambda s: s.assign(price=1e-250), "beyond 1e300"),
    ],
)
def test_bad_scenarios_are_named(everything, change, message):
    _, data, result = everything
    good = pd.DataFrame(
        {"sku": ["p00"], "price": [1.0], "promo": [0.0], "week": [10], "store": [1]}
    ).assign(exposure=0.0, cat="c0")
    predict(data, result.guide, good, num_samples=5)
    with pytest.raises(hbjax.DataValidationError, match=message):
        predict(data, result.guide, change(good), num_samples=5)


def test_to_arviz_has_every_value_on_its_labels(everything):
    import arviz as az

    _, data, result = everything
    idata = to_arviz(data, result.guide, num_samples=50, key=jax.random.key(2))
    posterior = idata.posterior
    draws = data.natural_draws(result.guide, 50, jax.random.key(2))
    np.testing.assert_array_equal(
        posterior["log_price__sub"].values[0], draws.slopes["log_price"]["sub"]
    )
    assert posterior["log_price__unit"].dims == ("chain", "draw", "sku")
    assert list(posterior["log_price__unit"].coords["sku"].values) == list(data.units)
    assert posterior["effect__cat_x_week"].dims[-1] == "cat:week"
    assert posterior["effect__cat_x_week"].coords["cat:week"].values[0] == "c0:10"
    np.testing.assert_array_equal(posterior["zero_inflation"].values[0], draws.zero_inflation)
    assert posterior["dispersion__cat"].dims[-1] == "cat"
    table = az.summary(idata, var_names=["promo__cat"], kind="stats")
    assert len(table) == len(data.levels["cat"])
