"""Every level against NUTS: intercepts, period effects, group slopes and best sellers' predictions.

Usage (``pip install -e ".[bench]"``, which brings BlackJAX)::

    python -m benchmarks.levels_nuts nuts --out ref.npz        # NUTS of hbjax's model, once
    python -m benchmarks.levels_nuts fit --ref ref.npz --seeds 0,1,2

A Poisson panel with best sellers (issue "Honest at every level", panel B's shape, smaller
so that NUTS runs on a laptop): ``--products`` products x ``--weeks`` weeks in
``--categories`` categories, 10% best sellers at 500-5,500 units a week among products
selling ~9, category x week effects, the article's model (:func:`hbjax.counts.
elasticity_data`). ``nuts`` runs BlackJAX NUTS (window adaptation, target acceptance 0.9)
on exactly that model's log joint and stores every natural value's posterior mean and sd
and the best sellers' expected units' 90% intervals. ``fit`` fits it with ``hbjax fit``'s
defaults (:func:`hbjax.counts.fit_counts`) for each seed and prints, per quantity, the
median (5-95%) ratio of hbjax's sd to NUTS's and the RMS error of hbjax's means in NUTS
sds; one JSON line per seed.

``--shape A`` (:func:`nested_panel`): panel A's shape instead, product < subcategory <
category, a promo slope by category, negative binomial counts with missing rows;
``--dependent/--no-dependent`` picks the guide (:class:`hbjax.vi.guide.DependentNormal`).

NUTS's posterior is the model's, whatever the parameterisation of the latents: the
reference holds natural values only, so one reference serves any version of hbjax (run
``fit`` with another tree on ``PYTHONPATH`` to compare versions).
"""

from __future__ import annotations

import argparse
import json
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

import hbjax
from hbjax.counts.slopes import GLOBAL, UNIT

from .nuts_validation import _split_rhat, nuts_chain


def _sales(
    rng: np.random.Generator,
    products: int,
    weeks: int,
    categories: int,
    best_every: int,
    low: float,
    high: float,
) -> tuple[np.ndarray, ...]:
    """Log sales levels (one best seller in ``best_every`` at ``low``-``high`` a week, the
    rest 3-15), the best sellers, category x week effects, each row's unit and week, log
    price over the unit's base price, and price."""
    level = np.log(rng.uniform(3, 15, products))
    best = rng.choice(products, max(1, products // best_every), replace=False)
    level[best] = np.log(rng.uniform(low, high, len(best)))
    gamma = rng.normal(0, 0.15, (categories, weeks))
    unit = np.repeat(np.arange(products), weeks)
    week = np.tile(np.arange(weeks), products)
    base_price = rng.uniform(2, 20, products)
    price = base_price[unit] * np.exp(rng.normal(0, 0.15, len(unit)))
    return level, best, gamma, unit, week, np.log(price / base_price[unit]), price


def panel(products: int, weeks: int, categories: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """A Poisson panel with 10% best sellers; returns the table and the best sellers' ids."""
    rng = np.random.default_rng(seed)
    category = np.arange(products) % categories
    b_cat = -2.0 + rng.normal(0, 0.4, categories)
    beta = b_cat[category] + rng.normal(0, 0.3, products)
    level, best, gamma, unit, week, x, price = _sales(
        rng, products, weeks, categories, 10, 500, 5500
    )
    log_rate = level[unit] + beta[unit] * x + gamma[category[unit], week]
    frame = pd.DataFrame(
        {
            "product": [f"p{i:04d}" for i in unit],
            "category": [f"c{c:02d}" for c in category[unit]],
            "period": week,
            "price": price,
            "units_sold": rng.poisson(np.exp(log_rate)),
        }
    )
    return frame, np.array([f"p{i:04d}" for i in best]), _truth(beta)


def _truth(beta: np.ndarray) -> pd.Series:
    """The true product elasticities on their labels."""
    return pd.Series(beta, index=[f"p{i:04d}" for i in range(len(beta))])


def nested_panel(
    products: int, weeks: int, categories: int, seed: int
) -> tuple[pd.DataFrame, np.ndarray]:
    """Panel A's shape (issue "Honest at every level"): product < subcategory < category.

    Three subcategories per category, a promo flag (on in 15% of rows) whose lift varies
    by category, 20% of rows missing, negative binomial counts (phi 0.3) around ~9 a week
    with 5% best sellers at 300-1,500 a week.
    """
    rng = np.random.default_rng(seed)
    sub = np.arange(products) % (3 * categories)
    category = sub % categories
    b_cat = -1.8 + rng.normal(0, 0.4, categories)
    b_sub = b_cat[np.arange(3 * categories) % categories] + rng.normal(0, 0.3, 3 * categories)
    beta = b_sub[sub] + rng.normal(0, 0.3, products)
    lift = 0.4 + rng.normal(0, 0.2, categories)
    level, best, gamma, unit, week, x, price = _sales(
        rng, products, weeks, categories, 20, 300, 1500
    )
    promo = (rng.uniform(size=len(unit)) < 0.15).astype(float)
    mu = np.exp(
        level[unit] + beta[unit] * x + lift[category[unit]] * promo + gamma[category[unit], week]
    )
    counts = rng.poisson(mu * rng.gamma(1 / 0.3, 0.3, len(unit)))
    keep = rng.uniform(size=len(unit)) >= 0.2
    frame = pd.DataFrame(
        {
            "product": [f"p{i:04d}" for i in unit],
            "subcategory": [f"s{c:02d}" for c in sub[unit]],
            "category": [f"c{c:02d}" for c in category[unit]],
            "period": week,
            "price": price,
            "promo": promo,
            "units_sold": counts,
        }
    )[keep]
    return frame, np.array([f"p{i:04d}" for i in best]), _truth(beta)


def _data(args: argparse.Namespace) -> tuple[hbjax.counts.CountData, np.ndarray, np.ndarray]:
    """The panel's data (``--learn-spreads``: learned sds), best sellers, true elasticities."""
    learn = getattr(args, "learn_spreads", False)
    if getattr(args, "shape", "B") == "A":
        frame, best, truth = nested_panel(
            args.products, args.weeks, args.categories, args.panel_seed
        )
        data = hbjax.counts.elasticity_data(
            frame,
            groups=("subcategory", "category"),
            covariates=("promo",),
            likelihood="negbin",
            learn_spreads=learn,
        )
    else:
        frame, best, truth = panel(args.products, args.weeks, args.categories, args.panel_seed)
        data = hbjax.counts.elasticity_data(frame, learn_spreads=learn)
    return data, best, truth.loc[data.units].to_numpy()


#: The article's names of the price slope's levels.
_PRICE = {"unit": "product elasticities", "category": "category elasticities"}


def _values(data: hbjax.counts.CountData, natural, best_rows: np.ndarray) -> dict[str, np.ndarray]:  # noqa: ANN001
    """``[draw, ...]`` per reported quantity: every slope's every level, intercepts, effects."""
    values = {}
    for name, levels in natural.slopes.items():
        for level, v in levels.items():
            label = _PRICE.get(level, f"{level} elasticities") if name == "log_price" else None
            label = label or f"{name} slope ({level})"
            values[label] = v[:, None] if v.ndim == 1 else v
    values["global elasticity"] = values.pop("global elasticities")
    values["intercepts"] = natural.intercept
    for k, v in natural.effects.items():
        values["category x week effects" if k == "category:period" else f"{k} effects"] = v
    if natural.dispersion is not None:
        values["dispersion"] = natural.dispersion[:, None]
    for name, levels in (natural.spreads or {}).items():
        values |= {f"{name} sd ({level})": v[:, None] for level, v in levels.items()}
    return values


def _predictions(data: hbjax.counts.CountData, draws, rows: np.ndarray) -> np.ndarray:  # noqa: ANN001
    """``[draw, row]`` expected units of the given rows."""
    subset = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)[rows]), data.rows)
    log_rate = jax.jit(jax.vmap(lambda z: data.model.log_rate(z, subset)))(draws)
    return np.exp(np.asarray(log_rate, np.float64))


def _best_rows(data: hbjax.counts.CountData, best: np.ndarray) -> np.ndarray:
    codes = data.units.get_indexer(best)
    return np.flatnonzero(np.isin(np.asarray(data.rows.unit), codes))


def _non_centred(model):  # noqa: ANN001, ANN202
    """NUTS's coordinates for a model with learned sds: each slope value ``parent + sd xi``.

    Returns ``to_latents(xi) -> (latents, log |Jacobian|)``: the same posterior (the model's
    own log joint plus the Jacobian) without the centred funnel between a level's values
    and its learned sd, which NUTS on the centred latents met (127 divergences).
    """

    def to_latents(xi):  # noqa: ANN001, ANN202
        slopes, log_jacobian = {}, 0.0
        for name, layer in model.slopes.items():
            z, eta = dict(xi.slopes[name]), (xi.spreads or {}).get(name, {})
            if not eta:
                slopes[name] = z
                continue
            logs = layer.log_spreads(eta)
            parent = layer.top(z[GLOBAL])[..., None]
            for j in reversed(range(len(layer.levels))):  # coarse to fine
                level = layer.levels[j]
                centre = parent if j == len(layer.levels) - 1 else parent[layer.parents[j]]
                value = centre + jnp.exp(logs[level]) * z[level]
                z[level] = layer.hierarchy.latent(value, centre, layer.top.loc, layer.scales[j])
                log_jacobian += eta[level] * value.size  # d latent / d xi = sd / scale
                parent = value
            if layer.per_unit:
                unit_parent = parent[model._unit_level(layer)] if layer.levels else parent
                value = unit_parent + jnp.exp(logs[UNIT]) * z[UNIT]
                z[UNIT] = layer.hierarchy.latent(
                    value, unit_parent, layer.top.loc, layer.unit_scale
                )
                log_jacobian += eta[UNIT] * value.size
            slopes[name] = z
        return eqx.tree_at(lambda t: t.slopes, xi, slopes), log_jacobian

    return to_latents


def nuts(args: argparse.Namespace) -> None:
    import blackjax
    from jax.flatten_util import ravel_pytree

    data, best, _ = _data(args)
    model, rows = data.model, jax.device_put(data.rows)
    start, unravel_xi = ravel_pytree(model.init_latents(data.rows))
    to_latents = _non_centred(model)
    unravel = lambda flat: to_latents(unravel_xi(flat))[0]  # noqa: E731

    def logdensity(flat):  # noqa: ANN001, ANN202
        latents, log_jacobian = to_latents(unravel_xi(flat))
        return model.log_joint(latents, rows) + log_jacobian

    begin = time.perf_counter()
    positions, divergent = [], 0
    for chain in range(args.chains):
        chain_positions, _, chain_divergent = nuts_chain(
            logdensity, start, chain, args.warmup, args.draws
        )
        positions.append(chain_positions)
        divergent += int(np.sum(chain_divergent))
        print(f"chain {chain}: {time.perf_counter() - begin:.0f} s", flush=True)
    flat = jnp.concatenate(positions)
    draws = jax.vmap(unravel)(flat)
    natural = jax.tree.map(np.asarray, jax.jit(jax.vmap(model.natural))(draws))
    best_rows = _best_rows(data, best)
    values = _values(data, natural, best_rows)
    per_chain = np.asarray(values["product elasticities"]).reshape(args.chains, args.draws, -1)
    rhat = _split_rhat(per_chain).max()
    predictions = _predictions(data, draws, best_rows)
    out = {f"{k}/mean": v.mean(0) for k, v in values.items()}
    out |= {f"{k}/sd": v.std(0, ddof=1) for k, v in values.items()}
    out["best/elasticity_index"] = data.units.get_indexer(best)
    out["best/rows"] = best_rows
    out["best/q05"], out["best/q95"] = np.quantile(predictions, [0.05, 0.95], axis=0)
    out["best/mean"] = predictions.mean(0)
    seconds = time.perf_counter() - begin
    config = {**vars(args), "seconds": seconds, "divergent": divergent, "rhat_max": float(rhat)}
    config["blackjax"], config["jax"] = blackjax.__version__, jax.__version__
    np.savez_compressed(args.out, config=json.dumps(config), **out)
    print(
        f"NUTS {args.chains} x {args.draws} in {seconds:.0f} s, divergent {divergent}, "
        f"max split R-hat (product elasticities) {rhat:.3f}; wrote {args.out}"
    )


def fit(args: argparse.Namespace) -> None:
    reference = np.load(args.ref)
    config = json.loads(str(reference["config"]))
    for name in ("products", "weeks", "categories", "panel_seed", "shape", "learn_spreads"):
        setattr(args, name, config.get(name, "B" if name == "shape" else False))
    data, best, truth = _data(args)
    for seed in [int(s) for s in args.seeds.split(",")]:
        start = time.perf_counter()
        config = hbjax.counts.FitConfig(seed=seed, progress=False, dependent=args.dependent)
        result = hbjax.counts.fit_counts(data, config)
        seconds = time.perf_counter() - start
        draws = result.guide.sample(args.samples, key=jax.random.key(seed + 1))
        natural = jax.tree.map(np.asarray, jax.jit(jax.vmap(data.model.natural))(draws))
        values = _values(data, natural, reference["best/rows"])
        index = reference["best/elasticity_index"]
        values["best sellers' elasticities"] = values["product elasticities"][:, index]
        reference_of = {k: k for k in values} | {
            "best sellers' elasticities": "product elasticities"
        }
        products = values["product elasticities"].mean(0)
        line = {
            "rmse_vs_truth": round(float(np.sqrt(np.mean((products - truth) ** 2))), 4),
            "learn_spreads": args.learn_spreads,
            "seed": seed,
            "steps": result.steps,
            "converged": result.converged,
            "seconds": round(seconds, 1),
            "dependent": args.dependent,
        }
        print(
            f"seed {seed}: {result.steps} steps, converged {result.converged}, {seconds:.0f} s; "
            f"product elasticities' RMSE vs the truth {line['rmse_vs_truth']}"
        )
        for name, v in values.items():
            ref = reference_of[name]
            mean, sd = reference[f"{ref}/mean"], reference[f"{ref}/sd"]
            if name == "best sellers' elasticities":
                mean, sd = mean[index], sd[index]
            ratio = v.std(0, ddof=1) / sd
            error = (v.mean(0) - mean) / sd
            q = np.quantile(ratio, [0.05, 0.5, 0.95])
            rms = float(np.sqrt(np.mean(error**2)))
            line[name] = {"sd_ratio": [round(float(x), 3) for x in q], "rms_error": round(rms, 3)}
            print(
                f"  {name:28s} sd ratio {q[1]:.2f} ({q[0]:.2f}-{q[2]:.2f}); mean error "
                f"{rms:.2f} NUTS sd (rms)"
            )
        predictions = _predictions(data, draws, reference["best/rows"])
        q05, q95 = np.quantile(predictions, [0.05, 0.95], axis=0)
        width = (q95 - q05) / (reference["best/q95"] - reference["best/q05"])
        q = np.quantile(width, [0.05, 0.5, 0.95])
        line["best sellers' expected units"] = {"width_ratio": [round(float(x), 3) for x in q]}
        print(
            f"  {'best sellers expected units':28s} 90% width ratio {q[1]:.2f} "
            f"({q[0]:.2f}-{q[2]:.2f})"
        )
        with open(args.results, "a") as handle:
            handle.write(json.dumps({"hbjax": hbjax.__file__, **line}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["nuts", "fit"])
    parser.add_argument("--products", type=int, default=100)
    parser.add_argument("--weeks", type=int, default=30)
    parser.add_argument("--categories", type=int, default=5)
    parser.add_argument(
        "--shape", choices=["A", "B"], default="B", help="A: nested_panel; B: panel"
    )
    parser.add_argument(
        "--learn-spreads", action="store_true", help="the model with learned sds (nuts only)"
    )
    parser.add_argument("--panel-seed", type=int, default=0)
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--out", default="benchmarks/results/levels-nuts-reference.npz")
    parser.add_argument("--ref", default="benchmarks/results/levels-nuts-reference.npz")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument(
        "--dependent",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="children follow their parents in the guide (FitConfig.dependent; default: yes)",
    )
    parser.add_argument("--results", default="benchmarks/results/levels-nuts.jsonl")
    args = parser.parse_args()
    nuts(args) if args.mode == "nuts" else fit(args)


if __name__ == "__main__":
    main()
