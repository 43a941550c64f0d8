"""The count-regression vocabulary (hbjax.counts): the article as one instance, the
likelihoods against independent formulas, input checks, and a three-level negative-binomial
model with two covariates recovered sharded and minibatched."""

import json
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from scipy import integrate, special, stats
from starts import unfitted
from tolerances import assert_f32_close, f32_rtol

import hbjax
from hbjax.counts import Effect, Slope, from_frame
from hbjax.io.tables import DataValidationError


def _article(frame: pd.DataFrame, hierarchy: str, intercept_prior: str) -> hbjax.counts.CountData:
    slopes, effects = hbjax.counts.elasticity_terms("price", ("category",), "period")
    return from_frame(
        frame,
        unit="product",
        counts="units_sold",
        groups=("category",),
        slopes=slopes,
        effects=effects,
        hierarchy=hierarchy,
        intercept_prior=intercept_prior,
    )


def _random_latents(shapes, seed: int, scale: float = 1.0):
    """Latents of the given shapes, each entry ``scale * N(0, 1)``."""
    leaves = jax.tree.leaves(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        jax.tree.structure(shapes),
        [scale * jax.random.normal(k, s.shape) for k, s in zip(keys, leaves, strict=True)],
    )


@pytest.mark.parametrize(
    ("hierarchy", "intercept_prior"), [("centred", "reference"), ("noncentred", "zero")]
)
def test_the_article_model_is_its_formula(small_sim, hierarchy, intercept_prior):
    """The article's log joint written out on the natural scale with scipy, at random latents.

    beta_g ~ N(-2, 1), beta_c ~ N(beta_g, 1), beta_i ~ N(beta_c, 2), gamma_ct ~ N(0, 3), the
    intercept at its prior's log price r_i (the reference price, or 0) ~ N(0, 3), and
    Poisson counts of rate exp(beta_i log p + gamma_ct + delta_i). The latents are affine in
    the natural values, so their log joint is this density plus log|Jacobian|: log 2 per
    product elasticity, log 3 per intercept and per (category, week) effect.
    """
    frame = small_sim.frame
    data = _article(frame, hierarchy, intercept_prior)
    model = data.model
    units = data.units.get_indexer(frame["product"])
    first = frame.groupby("product")["category"].first()
    groups = data.levels["category"].get_indexer(first.loc[data.units])
    # the centre is each unit's mean log price weighted by counts + 1/2
    log_p, y = np.log(frame["price"].to_numpy()), frame["units_sold"].to_numpy()
    centre = np.bincount(units, (y + 0.5) * log_p) / np.bincount(units, y + 0.5)
    assert_f32_close(model.centre("log_price"), centre, terms=2 * 20, magnitude=5.0)
    reference = centre if intercept_prior == "reference" else 0.0
    cell_of = data.cells["category:period"]
    cells = cell_of.get_indexer(pd.MultiIndex.from_frame(frame[["category", "period"]]))
    for seed in range(3):
        z = _random_latents(model.latent_shapes(), seed, 0.7)
        v = jax.tree.map(lambda x: np.asarray(x, np.float64), model.natural(z))
        beta = v.slopes["log_price"]
        b_g, b_c, b_i, delta = beta["global"], beta["category"], beta["unit"], v.intercept
        gamma = v.effects["category:period"]
        rate = np.exp(b_i[units] * log_p + gamma[cells] + delta[units])
        natural = (
            stats.norm.logpdf(b_g, -2.0, 1.0)
            + stats.norm.logpdf(b_c, b_g, 1.0).sum()
            + stats.norm.logpdf(b_i, b_c[groups], 2.0).sum()
            + stats.norm.logpdf(delta + b_i * reference, 0.0, 3.0).sum()
            + stats.norm.logpdf(gamma, 0.0, 3.0).sum()
            + stats.poisson.logpmf(y, rate).sum()
        )
        jacobian = len(data.units) * np.log(2.0 * 3.0) + len(cell_of) * np.log(3.0)
        got = float(model.log_joint(z, data.rows))
        # a float32 sum of every row's and latent's term: eps x terms x the largest term
        # (with the natural values' own float32 rounding); a 0.1-nat error in any term fails
        rows = np.asarray(model.row_log_likelihood(z, data.rows))
        terms = len(rows) + sum(x.size for x in jax.tree.leaves(z))
        assert_f32_close(got, natural + jacobian, terms=terms, magnitude=np.abs(rows).max() + 10)


def _rows_frame(rng, n_units=30, n_rows=12):
    unit = np.repeat(np.arange(n_units), n_rows)
    return pd.DataFrame(
        {
            "u": [f"u{i:02d}" for i in unit],
            "g": [f"g{i % 3}" for i in unit],
            "x": rng.normal(0, 1, len(unit)),
            "exposure": rng.uniform(0.5, 2.0, len(unit)),
            "y": rng.poisson(2.0, len(unit)) * (rng.random(len(unit)) < 0.7),
        }
    )


def test_negative_binomial_by_group_and_zero_inflation_match_scipy():
    """Each row's log-probability against scipy's zero-inflated negative binomial."""
    rng = np.random.default_rng(3)
    frame = _rows_frame(rng)
    data = from_frame(
        frame,
        unit="u",
        counts="y",
        groups=("g",),
        slopes=[Slope("x", over=("unit", "g"))],
        offset="exposure",
        likelihood="negbin",
        dispersion_by="g",
        zero_inflation=True,
    )
    model = data.model
    z = _random_latents(model.latent_shapes(), 1)
    got = np.asarray(model.row_log_likelihood(z, data.rows))
    # the reference: rows in the data's order, values from the natural parameters
    natural = model.natural(z)
    unit = np.asarray(data.rows.unit)
    order = np.argsort(pd.factorize(frame["u"], sort=True)[0], kind="stable")
    x = frame["x"].to_numpy()[order]
    y = frame["y"].to_numpy()[order]
    slope = np.asarray(natural.slopes["x"]["unit"])[unit]
    intercept = np.asarray(natural.intercept)[unit]  # at x = 0
    mean = np.exp(intercept + slope * x + frame["exposure"].to_numpy()[order])
    group = np.asarray(model.table.levels["g"])[unit]
    phi = np.asarray(natural.group_dispersion)[group]
    pi = float(natural.zero_inflation)
    n = 1 / phi
    log_nb = stats.nbinom.logpmf(y, n, n / (n + mean))
    expected = np.where(y > 0, np.log1p(-pi) + log_nb, np.log(pi + (1 - pi) * np.exp(log_nb)))
    # float32 log-gammas and logs of terms of size up to the largest |log p| (and lgamma(y+1)):
    # a few dozen roundings each
    size = np.abs(expected).max() + special.gammaln(y.max() + 1.0)
    assert_f32_close(got, expected, terms=64, magnitude=size)
    # the group dispersions sit around the global one with the stated prior
    log_phi = np.log(np.asarray(natural.group_dispersion))
    assert_f32_close(
        log_phi, math.log(float(natural.dispersion)) + 0.5 * np.asarray(z.group_dispersion), terms=4
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"counts": "nope"}, "missing column 'nope' (counts)"),
        ({"groups": ("g", "u")}, "distinct columns other than the unit"),
        ({"slopes": [Slope("x", over=("g", "unit"))]}, "fine to coarse"),
        ({"slopes": [Slope("x", over=("h",))]}, "neither 'unit' nor one of groups"),
        ({"slopes": [Slope("x", over=("unit",), scales=(1.0, 2.0))]}, "one sd per entry"),
        ({"slopes": [Slope("x", log=True)]}, "must be > 0 (its log is used)"),
        ({"dispersion_by": "u"}, "dispersion_by='u' must be one of groups"),
        ({"offset": "g"}, "holds text that is not a number"),
        ({"groups": ("unit",)}, "may not be named 'unit'"),
        (
            {"slopes": [Slope("x", over=("g",)), Slope("x", over=("unit",))]},
            "two slopes share a name",
        ),
        (
            {"slopes": [Slope("x2", log=True, over=("g",)), Slope("log_x2", over=("g",))]},
            "column 'log_x2' has the name hbjax gives the log of column 'x2'",
        ),
        ({"groups": ("g", "global")}, "may not be named 'global'"),
    ],
)
def test_bad_arguments_get_one_clear_line(change, message):
    frame = _rows_frame(np.random.default_rng(0))
    frame.loc[3, "x"] = -1.0
    frame["unit"] = frame["global"] = frame["g"]  # groups named as hbjax's own levels
    frame["x2"], frame["log_x2"] = np.exp(frame["x"]), frame["x"]
    arguments = {"unit": "u", "counts": "y", "groups": ("g",), **change}
    with pytest.raises(DataValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_frame(frame, **arguments)


def test_broken_nesting_and_bad_counts_are_named():
    frame = _rows_frame(np.random.default_rng(0))
    frame["h"] = np.where(frame["g"] == "g0", "h0", "h1")
    moved = frame.copy()
    moved.loc[5, "g"] = "g2"  # unit u00 now in two groups
    with pytest.raises(
        DataValidationError, match="unit 'u00' .* more than one group \\(column 'g'\\)"
    ):
        from_frame(moved, unit="u", counts="y", groups=("g", "h"))
    split = frame.copy()
    split.loc[split["u"] == "u01", "h"] = "h0"  # g1 now in h0 (u01) and h1 (others)
    with pytest.raises(DataValidationError, match="'g' 'g1' lies in more than one 'h'"):
        from_frame(split, unit="u", counts="y", groups=("g", "h"))
    negative = frame.copy()
    negative.loc[7, "y"] = -2
    with pytest.raises(DataValidationError, match="column 'y' has values that are negative"):
        from_frame(negative, unit="u", counts="y")
    with pytest.raises(ValueError, match="needs a likelihood with a dispersion"):
        from_frame(frame, unit="u", counts="y", groups=("g",), dispersion_by="g")


def _three_levels(rng, n_units=160, n_weeks=30, phi=1 / 3):
    """A negative-binomial panel: products in subcategories in categories; a price slope
    by product, subcategory and category; a promotion lift by category; category x week."""
    n_cat, n_sub = 3, 9
    sub_cat = np.arange(n_sub) % n_cat
    unit_sub = np.arange(n_units) % n_sub
    b_c = -2.0 + rng.normal(0, 0.5, n_cat)
    b_s = b_c[sub_cat] + rng.normal(0, 0.3, n_sub)
    b_i = b_s[unit_sub] + rng.normal(0, 0.3, n_units)
    lift = 0.4 + rng.normal(0, 0.2, n_cat)
    level = rng.normal(2.0, 0.5, n_units)
    week_effect = rng.normal(0, 0.2, (n_cat, n_weeks))
    unit = np.repeat(np.arange(n_units), n_weeks)
    week = np.tile(np.arange(n_weeks), n_units)
    cat = sub_cat[unit_sub][unit]
    log_price = rng.normal(0, 0.4, n_units)[unit] + rng.normal(0, 0.4, len(unit))
    promo = (rng.random(len(unit)) < 0.25).astype(float)
    mean = np.exp(level[unit] + b_i[unit] * log_price + lift[cat] * promo + week_effect[cat, week])
    y = rng.poisson(rng.gamma(1 / phi, mean * phi))
    frame = pd.DataFrame(
        {
            "sku": [f"s{u:03d}" for u in unit],
            "sub": [f"s{s}" for s in unit_sub[unit]],
            "cat": [f"c{c}" for c in cat],
            "week": week,
            "price": np.exp(log_price),
            "promo": promo,
            "qty": y,
        }
    )
    return frame, {"unit": b_i, "cat": lift, "phi": phi}


def _skus(frame: pd.DataFrame, **options) -> hbjax.counts.CountData:
    """A `_three_levels` table's model: products (sku) in subcategories in categories."""
    return from_frame(frame, unit="sku", counts="qty", groups=("sub", "cat"), **options)


@pytest.mark.usefixtures("standard_promotion")
def test_a_three_level_negbin_fit_stops_by_itself():
    """Convergence watches the slopes and the dispersion, not the intercepts and (group,
    week) effects, which share a level the iterates wander along (they drifted 1.5
    posterior sd over 5,000 steps while the slopes held still): a default fit of a
    three-level negative-binomial table stops by itself (tables 5-10: 2,800-3,300 steps;
    watching the intercepts, table 5 ran all 20,000 unconverged)."""
    frame, _ = _three_levels(np.random.default_rng(5), n_units=40, n_weeks=16)
    slopes, effects = hbjax.counts.elasticity_terms("price", ["sub", "cat"], "week", ["promo"])
    data = _skus(frame, slopes=slopes, effects=effects, period="week", likelihood="negbin")
    watched = data.model.reported_leaves()
    assert not watched.intercept and not any(watched.effects.values())
    assert watched.slopes["log_price"]["unit"] and watched.dispersion
    result = hbjax.counts.fit_counts(data, hbjax.counts.FitConfig(steps=8000, progress=False))
    assert result.converged and result.steps < 8000, result.convergence


@pytest.mark.usefixtures("standard_promotion")
@pytest.mark.parametrize("batch_size", [None, 40])
def test_three_levels_two_covariates_negbin_recovered_sharded(batch_size):
    """Sharded over 4 devices on the grid layout (and minibatched rows): intervals cover
    the truth.

    96 product slopes: the share of 90% intervals that cover them is binomial, sd 0.031
    at 0.9; the test asks for 0.78 (4 sd below; 0.88-0.97 over seeds 0-8). Their
    posterior sd must show the data's information (about 0.41 against the prior's 1:
    below 0.6). The dispersion and the three promotion lifts must lie within 4 posterior
    sd of the truth (within 2.4 over seeds 0-8).
    """
    frame, truth = _three_levels(np.random.default_rng(5), n_units=96, n_weeks=20)
    data = _skus(
        frame,
        slopes=[
            Slope("price", log=True, over=("unit", "sub", "cat"), prior=(-2.0, 1.0)),
            Slope("promo", over=("cat",)),
        ],
        effects=[Effect(("cat", "week"), scale=1.0)],
        period="week",
        likelihood="negbin",
    )
    model, mesh = data.model, hbjax.make_mesh()
    guide = hbjax.make_guide("unitblock", model, loc=model.init_latents(data.rows))
    result = hbjax.fit(
        model,
        guide,
        hbjax.Minibatches(data.rows, batch_size, mesh=mesh)
        if batch_size
        else hbjax.FullBatch(data.grid(mesh)),
        key=jax.random.key(0),
        steps=1000,
        convergence=None,
        progress=False,
    )
    tables = data.summary(result.guide, draws=400)
    slopes = tables["log_price/unit"]
    true_slopes = truth["unit"][[int(label[1:]) for label in slopes.index]]
    covered = np.mean((slopes["q05"] < true_slopes) & (true_slopes < slopes["q95"]))
    assert covered > 0.78
    assert slopes["sd"].mean() < 0.6
    lift = tables["promo/cat"]
    assert np.all(np.abs(lift["mean"] - truth["cat"]) < 4 * lift["sd"])
    phi = tables["dispersion"].iloc[0]
    assert abs(phi["mean"] - truth["phi"]) < 4 * phi["sd"]


def test_sharded_log_joint_and_gradient_match_one_device():
    """The vocabulary's rows sum in block order: 4 devices = unplaced, value and gradient."""
    frame, _ = _three_levels(np.random.default_rng(1), n_units=40, n_weeks=8)
    data = _skus(
        frame,
        slopes=[Slope("price", log=True, over=("unit", "sub")), Slope("promo")],
        effects=[Effect(("cat", "week"))],
        likelihood="negbin",
        dispersion_by="cat",
        zero_inflation=True,
    )
    model = data.model
    z = model.init_latents(data.rows)
    placed = hbjax.shard_rows(data.rows, hbjax.make_mesh())
    value_and_grad = jax.jit(jax.value_and_grad(model.log_joint))
    value, grad = value_and_grad(z, data.rows)
    value_4, grad_4 = value_and_grad(z, placed)
    # float32 sums of every row's term in block order vs one sum: rounding of n_rows terms
    rows = np.asarray(model.row_log_likelihood(z, data.rows))
    assert_f32_close(value_4, value, terms=len(rows) + 64, magnitude=np.abs(rows).max())
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(grad_4), strict=True):
        assert_f32_close(b, a, terms=len(rows), magnitude=np.abs(a).max())
    assert jnp.isfinite(value)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"likelihood": "negbin", "dispersion_by": "cat", "zero_inflation": True, "offset": "x"},
    ],
)
def test_the_grid_layout_equals_the_rows(options):
    """The grid's one-pass kernel gives the rows' log-likelihood and gradient (Poisson from
    sufficient statistics; NB with group dispersions, zero inflation and an offset
    differentiated per cell), with holes in the grid and effects keyed by a group level,
    by nothing (week alone) and by the unit; 2 and 4 devices agree (Poisson: bitwise)."""
    rng = np.random.default_rng(3)
    frame, _ = _three_levels(rng, n_units=40, n_weeks=8)
    frame["x"] = rng.normal(0, 0.3, len(frame))
    frame["store"] = frame["sku"]  # an effect per (unit, week): keyed by the unit
    frame = frame.sample(frac=0.8, random_state=0)  # holes
    data = _skus(
        frame,
        slopes=[Slope("price", log=True, over=("unit", "sub")), Slope("promo", over=("cat",))],
        effects=[Effect(("cat", "week")), Effect(("week",)), Effect(("store", "week"))],
        period="week",
        **options,
    )
    model = data.model
    z = _random_latents(model.latent_shapes(), 0, 0.3)
    value_and_grad = jax.jit(jax.value_and_grad(model.log_likelihood))
    value, grad = value_and_grad(z, data.rows)
    on = {n: value_and_grad(z, data.grid(hbjax.make_mesh(n), n_blocks=4)) for n in (1, 2, 4)}
    # a GPU's layout: 4 slots summed before each cell scatter, where one key fills them
    chunked = data.grid(hbjax.make_mesh(2), n_blocks=4, cell_chunk=4)
    assert chunked.cell_chunk == {"cat:week": 4, "week": 4, "store:week": 1}
    unchunked = data.grid(hbjax.make_mesh(2), n_blocks=4)
    assert chunked.observed.shape[0] > unchunked.observed.shape[0]  # padded runs
    on["chunked"] = value_and_grad(z, chunked)
    # the grid sums the rows' terms in another order (per cell, per block): float32 rounding
    rows = np.asarray(model.row_log_likelihood(z, data.rows))
    for got, got_grad in on.values():
        assert_f32_close(got, value, terms=len(rows), magnitude=np.abs(rows).max())
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(got_grad), strict=True):
            assert_f32_close(b, a, terms=len(rows), magnitude=np.abs(a).max())
    # 2 and 4 devices: blocks are summed in one order whatever the device count, but each
    # device's elementwise exp and log are compiled for its own array length, and XLA's
    # vector and scalar paths may round a cell's last bit differently (measured: jnp.exp
    # of 7 floats differs from the same floats in a longer array in 2 of 7): a few
    # roundings per cell, not per row
    rtol = f32_rtol(terms=4)
    np.testing.assert_allclose(on[2][0], on[4][0], rtol=rtol)
    for a, b in zip(jax.tree.leaves(on[2][1]), jax.tree.leaves(on[4][1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(a))))


def _shelves(seed: int, n_units: int = 24, n_weeks: int = 12) -> tuple[pd.DataFrame, dict]:
    """Poisson sales with covariates of everyday scales: a shelf length of 0-1000 cm, a
    year (2000 + week) and a column of ~5 with one row of 1e6."""
    rng = np.random.default_rng(seed)
    unit = np.repeat(np.arange(n_units), n_weeks)
    week = np.tile(np.arange(n_weeks), n_units)
    shelf = rng.uniform(0, 1000, len(unit))
    big = rng.uniform(0, 10, len(unit))
    big[7] = 1e6
    truth = {"log_price": -1.5, "shelf": 0.001, "year": 0.05, "big": 0.0}
    log_price = rng.normal(0, 0.3, len(unit))
    level = rng.normal(1.0, 0.3, n_units)[unit]
    log_rate = level + truth["log_price"] * log_price + truth["shelf"] * (shelf - 500)
    log_rate += truth["year"] * (week - n_weeks / 2)
    frame = pd.DataFrame(
        {
            "sku": [f"s{u:02d}" for u in unit],
            "week": week,
            "year": 2000 + week,
            "price": np.exp(log_price),
            "shelf": shelf,
            "big": big,
            "qty": rng.poisson(np.exp(log_rate)),
        }
    )
    return frame, truth


def _shelf_data(frame: pd.DataFrame, **options) -> hbjax.counts.CountData:
    slopes = [Slope("price", log=True, over=("unit",))]
    slopes += [Slope(c) for c in ("shelf", "year", "big")]
    return from_frame(frame, unit="sku", counts="qty", slopes=slopes, period="week", **options)


@pytest.mark.usefixtures("standard_promotion")
def test_covariates_are_standardised_inside_the_model():
    """A covariate's slope prior is per sd of its column, and the model computes with the
    standardised column: the same table in centimetres and in metres is one model (equal
    log joints at the same latents, slopes 100x apart), and the intercepts of an uncentred
    model sit at the column's mean (0 for a logged column: the article's)."""
    frame, _ = _shelves(0)
    metres = frame.assign(shelf=frame["shelf"] / 100)
    cm, m = _shelf_data(frame), _shelf_data(metres)
    for k in ("shelf", "year", "big"):
        assert cm.model.spread[k] == pytest.approx(frame[k].std(ddof=0), rel=1e-9)
        assert cm.model.origin[k] == pytest.approx(frame[k].mean(), rel=1e-9)
    assert (cm.model.spread["log_price"], cm.model.origin["log_price"]) == (1.0, 0.0)
    z = _random_latents(cm.model.latent_shapes(), 2, 0.5)
    joint = jax.jit(lambda model, z, rows: model.log_joint(z, rows))
    n_terms = len(cm.rows.unit) + 2 * cm.model.n_units
    assert float(joint(m.model, z, m.rows)) == pytest.approx(
        float(joint(cm.model, z, cm.rows)), rel=f32_rtol(n_terms)
    )
    per_cm, per_m = cm.model.linear_values(z).slopes["shelf"], m.model.linear_values(z).slopes
    for level, value in per_cm.items():
        assert_f32_close(per_m["shelf"][level], 100 * value, terms=4)
    # the slope per sd of the column has the Slope's prior: global N(0, 1)
    standard = per_cm["global"] * cm.model.spread["shelf"]
    assert float(standard) == pytest.approx(float(z.slopes["shelf"]["global"]), rel=1e-5)
    raw = _shelf_data(frame, centre=False)
    assert np.all(np.asarray(raw.model.centre("year")) == pytest.approx(frame["year"].mean()))
    assert not np.any(raw.model.centre("log_price"))


@pytest.mark.usefixtures("standard_promotion")
@pytest.mark.parametrize("centre", [True, False])
def test_covariates_of_everyday_scales_fit(centre):
    """Shelf lengths of 0-1000 cm, a year of 2000-2011 (uncentred: its intercepts at year
    2005.5, not year 0) and a column with one row of 1e6 fit by default and recover their
    slopes (before standardising, each made the first step non-finite)."""
    frame, truth = _shelves(1)
    data = _shelf_data(frame, centre=centre)
    result = hbjax.counts.fit_counts(data, hbjax.counts.FitConfig(progress=False))
    assert result.converged, result.convergence
    summary = data.summary(result.guide)
    for k, value in truth.items():
        row = summary[f"{k}/global"].iloc[0]
        assert abs(row["mean"] - value) < 4 * row["sd"], (k, row)
    assert summary["shelf/global"].iloc[0]["sd"] < 2e-4  # the data's, not the prior's 1/290


@pytest.mark.usefixtures("standard_promotion")
def test_rows_that_do_not_fit_the_grid_are_named_and_fitted_as_rows():
    from hbjax.parallel.layouts import Dense

    frame, _ = _three_levels(np.random.default_rng(4), n_units=24, n_weeks=6)
    terms = {"unit": "sku", "counts": "qty", "slopes": [Slope("price", log=True)]}
    with pytest.raises(hbjax.counts.GridError, match="period=column"):
        from_frame(frame, **terms).grid(hbjax.make_mesh())
    twice = from_frame(pd.concat([frame, frame.iloc[[7]]]), period="week", **terms)
    with pytest.raises(
        hbjax.counts.GridError, match="unit 's001' has more than one row in period 1"
    ):
        twice.grid(hbjax.make_mesh())
    config = hbjax.counts.FitConfig(steps=20, progress=False)
    for grid in ("grid", Dense()):  # asked for by name or module: refused with the reason
        with pytest.raises(hbjax.counts.GridError, match="more than one row"):
            hbjax.counts.fit_counts(twice, config, layout=grid)
    assert hbjax.counts.fit_counts(twice, config).steps == 20  # auto: the rows
    once = from_frame(frame, period="week", **terms)  # a GPU's chunked grid, asked for
    assert hbjax.counts.fit_counts(once, config, layout=Dense(cell_chunk=4)).steps == 20
    with pytest.raises(ValueError, match="full-batch"):
        hbjax.counts.fit_counts(
            twice, hbjax.counts.FitConfig(steps=20, batch_size=8), layout="grid"
        )


def test_an_effects_group_levels_are_carried_by_the_intercepts():
    """Each group's cells are an orthonormal map of their latents whose first coordinate
    is the group's mean; the data see intercepts plus effects only, so moving a group's
    level coordinate moves its intercepts and effects against each other and leaves every
    rate (and the likelihood) as it was (issue "Honest at every level")."""
    from hbjax.counts.regression import EffectLevels

    key = np.array([0, 1, 0, 2, 0, 1, 1])  # groups of 3, 3 and 1 cells
    split = EffectLevels("g", key, 3)
    h = np.asarray(jax.vmap(split.reflect)(jnp.eye(7)), np.float64)  # row i: H e_i (H = H^T)
    np.testing.assert_allclose(h @ h.T, np.eye(7), atol=f32_rtol(terms=8))
    assert np.all(h[key[:, None] != key[None, :]] == 0)  # no cell reaches another group
    z = np.asarray(jax.random.normal(jax.random.key(0), (7,)), np.float64)
    means = [np.mean((h.T @ z)[key == g]) for g in range(3)]
    assert_f32_close(split.mean(jnp.asarray(z, jnp.float32)), means, terms=8, magnitude=3.0)
    assert_f32_close(h[3, 3], 1.0, terms=2)  # a lone cell is its own level

    frame, _ = _three_levels(np.random.default_rng(3), n_units=30, n_weeks=8)
    data = _skus(
        frame,
        slopes=[Slope("price", log=True, over=("unit", "cat"))],
        effects=[Effect(("cat", "week"))],
        period="week",
    )
    model = data.model
    assert model.effect_levels["cat:week"].level == "cat"
    z = _random_latents(model.latent_shapes(), 2, 0.3)
    first = np.unique(np.asarray(model.effect_levels["cat:week"].key), return_index=True)[1]
    moved = eqx.tree_at(
        lambda v: v.effects["cat:week"], z, z.effects["cat:week"].at[first].add(1.0)
    )
    rate, moved_rate = (np.asarray(model.log_rate(v, data.rows)) for v in (z, moved))
    assert_f32_close(moved_rate, rate, terms=16, magnitude=np.abs(rate).max() + 3)
    shift = np.asarray(model.natural(moved).intercept - model.natural(z).intercept)
    assert np.all(np.abs(shift) > 0.1)  # the intercepts did move (by 3 / sqrt(8) = 1.06)


def test_effects_start_at_their_information():
    """The guide's starting sd of each effect coordinate is 1 / sqrt(scale^2 D + 1), D the
    diagonal of H^T diag(J) H for the cells' information J (sum of counts, Poisson); the
    groups' levels at the prior's 1; the rest of the guide as it was."""
    frame, _ = _three_levels(np.random.default_rng(4), n_units=30, n_weeks=8)
    data = _skus(
        frame,
        slopes=[Slope("price", log=True, over=("unit", "cat"))],
        effects=[Effect(("cat", "week"), scale=0.5)],
        period="week",
    )
    model = data.model
    scales = model.starting_scales(data.rows)
    split = model.effect_levels["cat:week"]
    cells = np.asarray(data.rows.columns["cells"]["cat:week"])
    counts = np.asarray(data.rows.columns["counts"], np.float64)
    info = np.bincount(cells, counts, len(split.key))
    h = np.asarray(jax.vmap(split.reflect)(jnp.eye(len(info))), np.float64).T  # columns H e_j
    diagonal = np.einsum("cj,c,cj->j", h, info, h)
    levels = np.isin(np.arange(len(info)), np.asarray(split.first))
    diagonal[levels] = 0.0
    expected = 1.0 / np.sqrt(0.25 * diagonal + 1.0)
    # float32 sums over the cells (the reflection's columns span one category's weeks)
    np.testing.assert_allclose(scales.effects["cat:week"], expected, rtol=f32_rtol(len(info)))
    assert np.all(scales.effects["cat:week"][levels] == 1.0) and levels.sum() == 3
    assert np.all(np.isnan(scales.intercept)) and np.all(
        np.isnan(scales.slopes["log_price"]["unit"])
    )
    guide = hbjax.make_guide("unitblock", model, loc=model.init_latents(data.rows))
    started = hbjax.counts.fit.start_scales(guide, scales)
    assert_f32_close(started.marginal_scale().effects["cat:week"], expected, terms=4)
    np.testing.assert_array_equal(started.raw_scale.intercept, guide.raw_scale.intercept)


def test_centring_is_a_reparametrisation_and_the_clip_clips():
    """`centre=False` takes the intercepts at covariates 0 for a logged covariate (the
    article's), at the column's mean over the rows for another: at the same usual
    intercepts (a - b c) the log joint is the same, prior included. `clip_log_rate` clips
    every row's log rate (the unclipped model's, clipped by NumPy), keeps the grid out and
    is saved."""
    frame, _ = _three_levels(np.random.default_rng(6), n_units=30, n_weeks=8)
    terms = {
        "slopes": [
            Slope("price", log=True, over=("unit", "sub"), prior=(-2.0, 1.0)),
            Slope("promo", over=("cat",)),
        ],
        "effects": [Effect(("cat", "week"))],
        "period": "week",
    }
    centred, raw = _skus(frame, **terms), _skus(frame, centre=False, **terms)
    assert not raw.model.centre_covariates and not np.any(raw.model.centre("log_price"))
    typical = centred.model.table.centre["log_price"]  # kept: predict's warnings need it
    np.testing.assert_array_equal(raw.model.table.centre["log_price"], typical)
    np.testing.assert_array_equal(centred.model.centre("log_price"), typical)
    assert not np.allclose(typical, 0)
    z = _random_latents(centred.model.latent_shapes(), 1, 0.3)
    usual = centred.model.linear_values(z).intercept  # a - sum_k b_k c_k
    promo = frame["promo"].to_numpy(np.float64)
    assert raw.model.centre("promo")[0] == pytest.approx(promo.mean())  # not 0
    b = centred.model.unit_slopes(z)
    at_origin = usual + sum(b[k] * raw.model.centre(k) for k in b)
    # the intercept latent carries the (cat, week) effect's level of the unit's category
    level = centred.model.intercept(z.intercept) - centred.model.intercept_values(z)
    latent = (at_origin + level - raw.model.intercept.loc) / raw.model.intercept.scale
    z_raw = eqx.tree_at(lambda v: v.intercept, z, latent)
    # the level added and taken away, (x - loc) / scale and back: six roundings
    size = float(np.abs(at_origin).max() + np.abs(level).max())
    assert_f32_close(raw.model.intercept_values(z_raw), at_origin, terms=6, magnitude=size)
    assert_f32_close(raw.model.linear_values(z_raw).intercept, usual, terms=10, magnitude=size)
    starts = [d.model.log_rate(d.model.init_latents(d.rows), d.rows) for d in (centred, raw)]
    # the same start either way: a, b (x - c) vs (a - b c) + b x, with terms of size |b x|
    size = np.abs(np.asarray(centred.rows.columns["x"]["log_price"])).max() * 3 + 3
    assert_f32_close(*starts, terms=8, magnitude=size)
    joint = jax.jit(lambda m, z, rows: m.log_joint(z, rows))
    value = float(joint(centred.model, z, centred.rows))
    # two float32 log joints (sums of every row's and latent's log density, all <= 0)
    n_terms = len(centred.rows.unit) + 2 * centred.model.n_units + 64
    assert float(joint(raw.model, z_raw, raw.rows)) == pytest.approx(value, rel=f32_rtol(n_terms))

    clip = (-1.0, 1.5)
    clipped = _skus(frame, clip_log_rate=clip, **terms)
    assert clipped.spec.clip_log_rate == clip and clipped.model.clip_log_rate == clip
    log_rate = np.asarray(centred.model.log_rate(z, centred.rows), np.float64)
    assert np.mean(log_rate < clip[0]) > 0.05 and np.mean(log_rate > clip[1]) > 0.05
    y = np.asarray(centred.rows.columns["counts"], np.float64)
    rate = np.clip(log_rate, *clip)
    expected = np.sum(y * rate - np.exp(rate) - special.gammaln(y + 1))
    got = float(clipped.model.log_likelihood(z, clipped.rows))
    assert got == pytest.approx(expected, rel=f32_rtol(terms=len(y) + 8))  # log-probs <= 0
    with pytest.raises(hbjax.counts.GridError, match="clipped log rate"):
        clipped.grid(hbjax.make_mesh())
    with pytest.raises(ValueError, match="lo < hi"):
        _skus(frame, clip_log_rate=(2.0, 1.0), **terms)


@pytest.mark.usefixtures("standard_promotion")
def test_cli_speaks_the_vocabulary(tmp_path, capsys):
    """`hbjax fit --group sub,cat --covariates promo --likelihood negbin` fits the
    vocabulary's model and reports the dispersion with its interval; `--clip` and
    `--no-centring` are the article's options there too."""
    from hbjax.cli import main

    frame, truth = _three_levels(np.random.default_rng(2), n_units=48, n_weeks=16)
    table = tmp_path / "sales.csv"
    frame.to_csv(table, index=False)
    common = [
        "fit", str(table), "--unit", "sku", "--group", "sub,cat", "--period", "week",
        "--price", "price", "--units", "qty", "--covariates", "promo",
    ]  # fmt: skip
    out = tmp_path / "out"
    args = [*common, "--likelihood", "negbin", "--steps", "400", "--samples", "200", "--plots"]
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    figures = ["loss", "shrinkage", "forest_sub", "forest_cat", "predictive"]
    for name in figures:  # --plots: every level's elasticities and the predictive check
        png = (out / "plots" / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000, name
    report = json.loads((out / "summary.json").read_text())
    assert report["groups"] == {"sub": 9, "cat": 3} and report["covariates"] == ["promo"]
    phi = report["dispersion"]
    assert phi["q05"] < phi["q50"] < phi["q95"] and abs(phi["mean"] - truth["phi"]) < 0.15
    estimates = pd.read_csv(out / "estimates.csv")
    lifts = estimates[estimates["quantity"] == "promo/cat"]
    assert list(lifts["label"]) == ["c0", "c1", "c2"]
    assert len(estimates[estimates["quantity"] == "log_price/unit"]) == 48
    assert "dispersion phi" in capsys.readouterr().out
    check = report["predictive_check"]
    assert check["level"] == "cat" and check["flagged"] == [], check["verdict"]
    assert [g["group"] for g in check["groups"]] == ["c0", "c1", "c2"]
    # `hbjax predict OUT scenarios.csv` reads the saved fit: the Python API's answer
    scenarios = frame.iloc[[0, 0, 20]][["sku", "week", "price", "promo"]]
    scenarios = scenarios.assign(price=[1.0, 2.0, 1.5], promo=[0.0, 0.0, 1.0])
    scenarios.to_csv(tmp_path / "scenarios.csv", index=False)
    predict_args = ["predict", str(out), str(tmp_path / "scenarios.csv"), "--samples", "300"]
    assert main(predict_args) == 0
    assert "predicted expected qty for 3 rows (unitblock guide" in capsys.readouterr().out
    written = pd.read_csv(tmp_path / "scenarios.csv.predictions.csv")
    saved = hbjax.counts.load_fit(out)
    # the saved fit holds the fitted dispersion: the same summary again (exact: exp of m)
    again = saved.data.summary(saved.guide)["dispersion"].iloc[0]
    np.testing.assert_allclose(again["q50"], phi["q50"], rtol=f32_rtol(terms=4))
    expected = hbjax.counts.predict(
        saved.data, saved.guide, scenarios, num_samples=300, key=jax.random.key(0)
    )
    np.testing.assert_allclose(written["expected_units"], expected["expected_units"], rtol=1e-6)
    assert written["expected_units"][0] > written["expected_units"][1]  # the price doubled
    # the article's options: intercepts at log price 0, the log rate clipped (on rows)
    article = [*common, "--clip", "--no-centring", "--steps", "60", "--samples", "50"]
    assert main([*article, "--no-progress", "--out", str(tmp_path / "article")]) == 0
    report = json.loads((tmp_path / "article" / "summary.json").read_text())
    assert report["price_centring"] is False and report["clip_log_rate"] == [-4.0, 20.0]
    model = hbjax.counts.load_fit(tmp_path / "article").data.model
    assert model.clip_log_rate == (-4.0, 20.0)
    assert not model.centre_covariates
    twice = pd.concat([frame, frame.iloc[:1]])
    twice.to_csv(table, index=False)
    assert main([*common, "--out", str(tmp_path / "twice")]) == 2
    assert "appears more than once" in capsys.readouterr().err
    assert not (tmp_path / "twice").exists()


@pytest.mark.usefixtures("standard_promotion")
def test_hbjax_check_of_a_vocabulary_fit_tells_good_from_bad(tmp_path, capsys):
    """`hbjax check OUT FILE` on a --group a,b fit: NUTS on a subsample of products and the
    per-product k-hat, on the elasticity scale (measured, tables 5-6 x keys 0-2: sd ratio
    0.99-1.04, all covered, no unit at k-hat >= 0.7)."""
    from hbjax.cli import main
    from hbjax.vi.checks import nuts_check

    frame, _ = _three_levels(np.random.default_rng(5), n_units=40, n_weeks=16)
    frame.to_csv(tmp_path / "sales.csv", index=False)
    flags = ["--unit", "sku", "--group", "sub,cat", "--period", "week", "--price", "price"]
    flags += ["--units", "qty", "--likelihood", "negbin", "--steps", "3000", "--no-progress"]
    out = tmp_path / "out"
    assert main(["fit", str(tmp_path / "sales.csv"), *flags, "--out", str(out)]) == 0
    # the true likelihood is not flagged (this table once was, for 10.2% zeros against
    # 14.2% replicated: see hbjax.counts.check.ZERO_SHARE_FACTOR)
    assert json.loads((out / "summary.json").read_text())["predictive_check"]["flagged"] == []
    check = ["check", str(out), str(tmp_path / "sales.csv"), "--products", "8"]
    assert main([*check, "--warmup", "100", "--draws", "100", "--chains", "2"]) == 0
    printed = capsys.readouterr().out
    assert "intervals against NUTS: good" in printed and "per-product k-hat: good" in printed
    table = pd.read_csv(out / "check.csv")
    assert len(table) == 8 and set(table["leaf"]) == {"elasticity"}
    assert set(table["sku"]) <= set(frame["sku"]) and table["covered"].all()
    assert ((table["q05"] < table["nuts_median"]) & (table["nuts_median"] < table["q95"])).all()
    # (the same checks call a narrow guide poor: tests/test_guide_check.py)
    key = jax.random.key(0)
    no_price = _skus(frame, slopes=[Slope("promo", over=("cat",))], period="week")
    fitted = unfitted(no_price)  # what is saved, not how well it fits, is checked here
    hbjax.counts.save_fit(no_price, fitted, tmp_path / "no_price")
    assert main(["check", str(tmp_path / "no_price"), str(tmp_path / "sales.csv")]) == 2
    assert "no per-product log slope" in capsys.readouterr().err
    with pytest.raises(ValueError, match="nothing for NUTS to compare"):  # no reported unit leaf
        nuts_check(
            fitted.model, fitted.guide, no_price.rows, key=key, num_units=2, warmup=10, draws=20
        )
    # every per-product slope the verdict covers is in the table, the price first
    slopes = [Slope("price", log=True, over=("unit", "sub")), Slope("promo", over=("unit",))]
    two = _skus(frame, slopes=slopes, period="week")
    hbjax.counts.save_fit(two, unfitted(two), tmp_path / "two")
    check_two = ["check", str(tmp_path / "two"), str(tmp_path / "sales.csv"), "--products", "3"]
    assert main([*check_two, "--warmup", "20", "--draws", "20", "--chains", "1"]) == 0
    assert " slope " in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "two" / "check.csv")
    assert list(table["leaf"]) == ["elasticity"] * 3 + ["promo"] * 3
    assert list(table["sku"][:3]) == list(table["sku"][3:])
    other = frame.assign(sku=frame["sku"].str.upper())  # another table: refused, named
    other.to_csv(tmp_path / "other.csv", index=False)
    assert main(["check", str(out), str(tmp_path / "other.csv")]) == 2
    assert "is not the table" in capsys.readouterr().err


@pytest.mark.usefixtures("standard_promotion")
def test_the_predictive_check_sees_structural_zeros():
    """Poisson counts with 30% structural zeros: a plain Poisson fit is flagged for its zero
    share (it replicates ~10% zeros against ~32% observed) and a zero-inflated fit is not
    (seeds 0-4, keys 1-2: always so; p-values 0 and 0.3-0.7)."""
    rng = np.random.default_rng(0)
    n_units, n_weeks = 40, 12
    unit = np.repeat(np.arange(n_units), n_weeks)
    price = np.exp(rng.normal(0, 0.3, len(unit)))
    rate = np.exp(rng.normal(1.5, 0.3, n_units)[unit] - 1.5 * np.log(price))
    y = np.where(rng.random(len(unit)) < 0.3, 0, rng.poisson(rate))
    frame = pd.DataFrame(
        {"u": unit, "g": unit % 4, "week": np.tile(np.arange(n_weeks), n_units), "p": price, "y": y}
    )
    flagged = {}
    for inflated in (False, True):
        data = from_frame(
            frame,
            unit="u",
            counts="y",
            groups=("g",),
            slopes=[Slope("p", log=True, over=("unit", "g"), prior=(-2.0, 1.0))],
            period="week",
            zero_inflation=inflated,
        )
        result = hbjax.counts.fit_counts(data, hbjax.counts.FitConfig(steps=600, progress=False))
        check = hbjax.counts.predictive_check(data, result.guide, key=jax.random.key(1))
        flagged[inflated] = check.flagged
        assert len(check.to_dict()["groups"]) == 4
    assert "zero_share" in flagged[False] and flagged[True] == [], flagged
    with pytest.raises(ValueError, match="num_draws"):
        hbjax.counts.predictive_check(data, result.guide, key=jax.random.key(1), num_draws=3)


@pytest.mark.usefixtures("standard_promotion")
def test_summaries_are_exact_for_a_gaussian_guide():
    """Closed-form summaries against 100,000 draws of the same (low-rank, correlated)
    guide. Values affine in the latents: means within 5 Monte Carlo standard errors
    (sd / 316), sds within 5 of theirs (sd / 447), quantiles within 5 of theirs (at most
    2.1 sd / 316). Dispersions and the zero share, monotone transforms of normals: their
    quantiles mapped back (log, logit) within 5 standard errors of the normal's quantiles,
    and their means and sds equal to scipy's log-normal and to the logit-normal's integral.
    (90 category x week cells, mixed within each category by the effects' levels: probed
    entry by entry in compiled chunks.)"""
    frame, _ = _three_levels(np.random.default_rng(6), n_units=30, n_weeks=30)
    data = _skus(
        frame,
        slopes=[Slope("price", log=True, over=("unit", "cat")), Slope("promo", over=("cat",))],
        effects=[Effect(("cat", "week"))],
        period="week",
        likelihood="negbin",
        dispersion_by="cat",
        zero_inflation=True,
    )
    # a low-rank guide at the regression start (no fit: a summary of any Gaussian guide is
    # exact), correlated and wide, so that the transforms' curvature shows
    model, key = data.model, jax.random.key(0)
    guide = hbjax.make_guide("lowrank", model, loc=model.init_latents(data.rows), key=key)
    guide = eqx.tree_at(lambda g: g.factor, guide, replace_fn=lambda w: 0.1 + 3.0 * w)
    linear_mean, linear_sd = data.exact_for(guide)
    assert linear_sd.effects["cat:week"].shape == (90,)
    exact = data.summary(guide)

    class Draws:  # not a GaussianGuide: the summary draws
        def sample(self, n, *, key):
            return guide.sample(n, key=key)

    n = 100_000
    drawn = data.summary(Draws(), draws=n, key=jax.random.key(3))
    assert exact.keys() == drawn.keys()
    quantiles = ("q05", "q50", "q95")
    transformed = {
        "dispersion": (np.log, linear_mean.dispersion, linear_sd.dispersion),
        "dispersion/cat": (np.log, linear_mean.group_dispersion, linear_sd.group_dispersion),
        "zero_inflation": (
            lambda p: np.log(p / (1 - p)),
            linear_mean.zero_inflation,
            linear_sd.zero_inflation,
        ),
    }
    for name, table in exact.items():
        other, sd = drawn[name], drawn[name]["sd"].to_numpy()
        assert np.all(np.abs(table["mean"] - other["mean"]) < 5 * sd / np.sqrt(n)), name
        if name not in transformed:
            assert np.all(np.abs(table["sd"] - other["sd"]) < 5 * sd / np.sqrt(2 * n)), name
            for q in quantiles:
                assert np.all(np.abs(table[q] - other[q]) < 5 * 2.2 * sd / np.sqrt(n)), name
            continue
        inverse, m, s = transformed[name]
        for q in quantiles:
            gap = np.abs(inverse(table[q].to_numpy()) - inverse(other[q].to_numpy()))
            assert np.all(gap < 5 * 2.2 * np.asarray(s) / np.sqrt(n)), (name, q)
        m, s = np.atleast_1d(m), np.atleast_1d(s)
        if name.startswith("dispersion"):
            expected = stats.lognorm(s, scale=np.exp(m))
            np.testing.assert_allclose(table["mean"], expected.mean(), rtol=1e-6)
            np.testing.assert_allclose(table["sd"], expected.std(), rtol=1e-6)
        else:
            density = stats.norm(m[0], s[0]).pdf
            moment = [
                integrate.quad(lambda x, k=k: density(x) * special.expit(x) ** k, -40, 40)[0]
                for k in (1, 2)
            ]
            np.testing.assert_allclose(table["mean"], moment[0], rtol=1e-7)
            np.testing.assert_allclose(table["sd"], np.sqrt(moment[1] - moment[0] ** 2), rtol=1e-6)


@pytest.mark.usefixtures("standard_promotion")
@pytest.mark.filterwarnings("ignore::hbjax.ConvergenceWarning")
def test_a_resumed_vocabulary_fit_equals_the_uninterrupted_one(tmp_path):
    frame, _ = _three_levels(np.random.default_rng(7), n_units=16, n_weeks=6)
    terms = {
        "slopes": [Slope("price", log=True, over=("unit", "cat")), Slope("promo")],
        "effects": [Effect(("cat", "week"))],
        "period": "week",
        "likelihood": "negbin",
    }
    data = _skus(frame, **terms)
    folder = str(tmp_path / "ckpt")
    common = {"progress": False, "checkpoint_every": 50}
    hbjax.counts.fit_counts(
        data, hbjax.counts.FitConfig(steps=100, checkpoint_dir=folder, **common)
    )
    resumed = hbjax.counts.fit_counts(
        data, hbjax.counts.FitConfig(steps=150, checkpoint_dir=folder, resume=True, **common)
    )
    # checkpointed elsewhere: chunks of 50 steps, the program compiled for the fits above
    # (chunk lengths do not change results: tests/test_fit.py)
    elsewhere = str(tmp_path / "whole")
    whole = hbjax.counts.fit_counts(
        data, hbjax.counts.FitConfig(steps=150, checkpoint_dir=elsewhere, **common)
    )
    assert resumed.steps == whole.steps == 150
    np.testing.assert_array_equal(resumed.losses, whole.losses)
    for a, b in zip(jax.tree.leaves(resumed.guide), jax.tree.leaves(whole.guide), strict=True):
        np.testing.assert_array_equal(a, b)
    other = _skus(frame.assign(qty=frame["qty"] + 1), **terms)
    config = hbjax.counts.FitConfig(steps=200, checkpoint_dir=folder, resume=True, **common)
    with pytest.raises(hbjax.vi.checkpoint.CheckpointError, match="data"):
        hbjax.counts.fit_counts(other, config)


def test_the_grid_of_a_table_whose_last_cell_is_missing_equals_the_rows():
    """(category, period) cells with the last pair absent: the grid's cell table is not the
    identity (it points that pair at the appended zero), and its log-likelihood is the
    rows' (it failed to reshape the effect before)."""
    from test_data import frame

    slopes, effects = hbjax.counts.elasticity_terms("price", ("category",), "period")
    common = {"unit": "product", "counts": "units_sold", "groups": ("category",)}
    with pytest.warns(hbjax.DataWarning):  # product c: one price; category y: one product
        data = from_frame(frame(), slopes=slopes, effects=effects, period="period", **common)
    n_cells = len(data.cells["category:period"])
    assert n_cells < len(data.levels["category"]) * len(data.periods)  # a pair is missing
    z = _random_latents(data.model.latent_shapes(), 2, 0.3)
    rows = data.model.log_likelihood(z, data.rows)
    grid = data.model.log_likelihood(z, data.grid(hbjax.make_mesh(1)))
    values = np.asarray(data.model.row_log_likelihood(z, data.rows))
    assert_f32_close(grid, rows, terms=len(values), magnitude=np.abs(values).max())


@pytest.mark.parametrize(
    "bad", [{"prior": (-2.0, -1.0)}, {"prior": (float("nan"), 1.0)}, {"scales": (1.0, 0.0)}]
)
def test_a_slope_with_an_impossible_prior_is_refused_when_built(bad):
    with pytest.raises(ValueError, match="Slope\\('price'\\)"):
        Slope("price", over=("unit", "g"), **bad)
