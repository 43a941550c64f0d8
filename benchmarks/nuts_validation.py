"""Guides against MCMC: a NUTS gold standard on a small panel, and each guide's intervals.

Usage (``pip install -e ".[bench]"``, which brings BlackJAX and NumPyro)::

    python -m benchmarks.nuts_validation reference   # NUTS -> tests/data/nuts_reference.npz
    python -m benchmarks.nuts_validation compare     # guides + NumPyro baseline -> table

``reference`` runs BlackJAX NUTS (window adaptation) on exactly hbjax's model density
(:func:`hbjax.counts.elasticity_data`'s model, ``log_joint`` of its latents) for the panel
``PANEL`` (200 products x 52 weeks, 10 categories), 4 chains, and stores the posterior
mean, sd and 90% interval of every product and category elasticity with the truth and
convergence figures. The test suite compares the default guide against this file
(``tests/test_validation.py``): the file is generated once, here, and kept in the repo.

``compare`` fits each guide (the CLI's pipeline: data-informed start, Rényi alpha=0, K=4,
20,000 steps) and the article's NumPyro set-up (AutoNormal + RenyiELBO(4), raw prices,
20,000 steps) on the same panel, and reports per method: median ratio of posterior sd to
NUTS sd (product elasticities), RMSE of posterior means to NUTS means in NUTS-sd units,
90% interval coverage of the true elasticities (NUTS's own for reference), and the speed
of a step relative to mean-field.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

import hbjax

PANEL = {"n_units": 200, "n_periods": 52, "n_groups": 10, "seed": 2026}
REFERENCE = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "nuts_reference.npz")
STEPS = 20_000


def panel_and_model(*, centre_prices: bool = True, hierarchy: str = "centred"):  # noqa: ANN201
    sim = hbjax.simulate(**PANEL)
    data = hbjax.counts.elasticity_data(sim.frame, centre=centre_prices, hierarchy=hierarchy)
    return sim, data.rows, data, data.model


def _split_rhat(draws: np.ndarray) -> np.ndarray:
    """Split R-hat over ``[chain, draw, ...]`` (Gelman et al. BDA3, 11.4)."""
    half = draws.shape[1] // 2
    chains = np.concatenate([draws[:, :half], draws[:, half : 2 * half]], axis=0)
    n = chains.shape[1]
    within = chains.var(axis=1, ddof=1).mean(axis=0)
    between = n * chains.mean(axis=1).var(axis=0, ddof=1)
    return np.sqrt(((n - 1) / n * within + between / n) / within)


def nuts_chain(logdensity, start, chain: int, warmup: int, draws: int):  # noqa: ANN001, ANN201
    """One BlackJAX NUTS chain (window adaptation, target acceptance 0.9) from ``start``
    jittered by 0.1: ``[draw, dim]`` positions, leapfrog steps and divergences per draw."""
    import blackjax

    warm_key, sample_key, jitter = jax.random.split(jax.random.key(100 + chain), 3)
    position = start + 0.1 * jax.random.normal(jitter, start.shape)
    adapt = blackjax.window_adaptation(blackjax.nuts, logdensity, target_acceptance_rate=0.9)
    (state, parameters), _ = adapt.run(warm_key, position, num_steps=warmup)
    kernel = jax.jit(blackjax.nuts(logdensity, **parameters).step)

    def one(state, key):  # noqa: ANN001, ANN202
        state, info = kernel(key, state)
        return state, (state.position, info.num_integration_steps, info.is_divergent)

    return jax.lax.scan(one, state, jax.random.split(sample_key, draws))[1]


def reference(args: argparse.Namespace) -> None:
    import blackjax
    from jax.flatten_util import ravel_pytree

    sim, panel, _, model = panel_and_model()
    placed = jax.device_put(panel)
    start, unravel = ravel_pytree(model.init_latents(panel))

    def logdensity(flat):  # noqa: ANN001, ANN202
        return model.log_joint(unravel(flat), placed)

    begin = time.perf_counter()
    chains, info = [], []
    for chain in range(args.chains):
        positions, steps, divergent = nuts_chain(logdensity, start, chain, args.warmup, args.draws)
        natural = jax.vmap(lambda f: model.natural(unravel(f)))(positions)
        chains.append(
            {
                "unit": np.asarray(natural.slopes["log_price"]["unit"]),
                "group": np.asarray(natural.slopes["log_price"]["category"]),
            }
        )
        info.append((float(np.mean(steps)), int(np.sum(divergent))))
        print(f"chain {chain}: mean leapfrog steps {info[-1][0]:.0f}, divergent {info[-1][1]}")
    seconds = time.perf_counter() - begin
    unit = np.stack([c["unit"] for c in chains])  # [chain, draw, unit]
    group = np.stack([c["group"] for c in chains])
    flat_unit = unit.reshape(-1, unit.shape[-1])
    truth = sim.truth["elasticity"].to_numpy()
    q05, q95 = np.quantile(flat_unit, [0.05, 0.95], axis=0)
    rhat = _split_rhat(unit)
    os.makedirs(os.path.dirname(REFERENCE), exist_ok=True)
    np.savez_compressed(
        REFERENCE,
        unit_mean=flat_unit.mean(0),
        unit_sd=flat_unit.std(0, ddof=1),
        unit_q05=q05,
        unit_q95=q95,
        group_mean=group.reshape(-1, group.shape[-1]).mean(0),
        group_sd=group.reshape(-1, group.shape[-1]).std(0, ddof=1),
        truth=truth,
        group_truth=sim.group_truth["elasticity"].to_numpy(),
        rhat_max=rhat.max(),
        config=json.dumps(
            {
                **PANEL,
                "chains": args.chains,
                "warmup": args.warmup,
                "draws": args.draws,
                "seconds": seconds,
                "blackjax": blackjax.__version__,
                "jax": jax.__version__,
            }
        ),
    )
    coverage = float(np.mean((q05 <= truth) & (truth <= q95)))
    print(
        f"NUTS: {args.chains} x {args.draws} draws in {seconds:.0f} s; max split R-hat "
        f"{rhat.max():.3f}; 90% coverage of the truth {coverage:.3f}; wrote {REFERENCE}"
    )


def compare_guide(
    kind: str,
    reference: dict,
    *,
    steps: int,
    gradient: str = "total",
    centre: bool = True,
    hierarchy: str = "centred",
) -> dict:
    """Fit one guide as the CLI does; its figures against the NUTS reference."""
    _, panel, data, model = panel_and_model(centre_prices=centre, hierarchy=hierarchy)
    guide = hbjax.make_guide(kind, model, loc=model.init_latents(panel))

    def objective(model, guide, panel, *, key):  # noqa: ANN001, ANN202
        return hbjax.vi.objectives.renyi_elbo(model, guide, panel, key=key, gradient=gradient)

    with jax.numpy_dtype_promotion("standard"):
        result = hbjax.fit(
            model,
            guide,
            panel,
            key=jax.random.key(0),
            steps=steps,
            objective=objective,
            progress=False,
        )
        check = hbjax.vi.checks.unit_importance(
            result.model, result.guide, panel, key=jax.random.key(2)
        )
    tables = data.summary(result.guide, draws=4000, key=jax.random.key(1))
    notes = [
        n
        for n in (
            gradient != "total" and gradient,
            hierarchy != "centred" and f"{hierarchy} hierarchy",
            not centre and "raw prices",
        )
        if n
    ]
    return {
        "method": f"hbjax {kind}" + (f" ({', '.join(notes)})" if notes else ""),
        **score(tables["log_price/unit"], reference, tables["log_price/category"]),
        "it_per_s": result.iterations_per_second,
        "unit_k_share": check.share_poor,
    }


def score(units, reference: dict, groups=None) -> dict:  # noqa: ANN001
    """sd ratio, mean error in NUTS sds, coverage, from a units table (q05, q95, mean, sd)."""
    truth = reference["truth"]
    covered = (units["q05"].to_numpy() <= truth) & (truth <= units["q95"].to_numpy())
    z = (units["mean"].to_numpy() - reference["unit_mean"]) / reference["unit_sd"]
    group_ratio = (
        float("nan")
        if groups is None
        else float(np.median(groups["sd"].to_numpy() / reference["group_sd"]))
    )
    return {
        "sd_ratio_median": float(np.median(units["sd"].to_numpy() / reference["unit_sd"])),
        "mean_error_rms_nuts_sd": float(np.sqrt(np.mean(z**2))),
        "coverage_90": float(np.mean(covered)),
        "group_sd_ratio_median": group_ratio,
    }


def numpyro_baseline(reference: dict, *, steps: int) -> dict:
    """The article's set-up: AutoNormal + RenyiELBO(4), raw prices, ``steps`` steps."""
    import numpyro
    import pandas as pd

    from benchmarks import article_numpyro as article

    sim, _, _, _ = panel_and_model()
    data = article.make_data(sim.frame)
    svi, guide = article.make_svi(data)
    state = svi.init(jax.random.key(0), article.static_data(data), data["outcome"])
    compiled = article.run_steps(svi, data, steps).lower(state).compile()
    start = time.perf_counter()  # steps only, as hbjax's it/s
    state, _ = compiled(state)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    params = svi.get_params(state)
    predictive = numpyro.infer.Predictive(
        article.model,
        guide=guide,
        params=params,
        num_samples=4000,
        return_sites=["product_a", "category_a"],
    )
    draws = predictive(jax.random.key(1), article.static_data(data), None)
    # make_data numbers labels in order of appearance; the reference is in sorted order
    order = pd.Index(data["products"]).get_indexer(sim.truth["product"])
    product = np.asarray(draws["product_a"])[:, order]
    categories = pd.factorize(sim.frame["category"])[1]
    category = np.asarray(draws["category_a"])[
        :, pd.Index(categories).get_indexer(sim.group_truth["category"])
    ]
    q05, q95 = np.quantile(product, [0.05, 0.95], axis=0)
    units = pd.DataFrame(
        {"mean": product.mean(0), "sd": product.std(0, ddof=1), "q05": q05, "q95": q95}
    )
    groups = pd.DataFrame({"sd": category.std(0, ddof=1)})
    return {
        "method": "NumPyro AutoNormal + RenyiELBO(4) (article)",
        **score(units, reference, groups),
        "it_per_s": steps / seconds,
        "unit_k_share": float("nan"),
    }


def compare(args: argparse.Namespace) -> None:
    reference = dict(np.load(REFERENCE))
    truth = reference["truth"]
    nuts_coverage = float(
        np.mean((reference["unit_q05"] <= truth) & (truth <= reference["unit_q95"]))
    )
    rows = [
        {
            "method": "NUTS (reference)",
            "sd_ratio_median": 1.0,
            "mean_error_rms_nuts_sd": 0.0,
            "coverage_90": nuts_coverage,
            "group_sd_ratio_median": 1.0,
            "it_per_s": float("nan"),
            "unit_k_share": float("nan"),
        }
    ]
    variants = [{"kind": kind} for kind in args.guides.split(",")]
    if args.dreg:
        variants.append({"kind": "unitblock", "gradient": "dreg"})
    for kind in [k for k in args.noncentred.split(",") if k]:  # the article's hierarchy
        variants.append({"kind": kind, "hierarchy": "noncentred"})
        variants.append({"kind": kind, "hierarchy": "noncentred", "centre": False})
    for variant in variants:
        rows.append(compare_guide(reference=reference, steps=args.steps, **variant))
        print(json.dumps(rows[-1]), flush=True)
    if not args.skip_numpyro:
        rows.append(numpyro_baseline(reference, steps=args.steps))
        print(json.dumps(rows[-1]), flush=True)
    mean_field = next(r["it_per_s"] for r in rows if r["method"] == "hbjax meanfield")
    for r in rows:
        r["step_time_vs_meanfield"] = mean_field / r["it_per_s"]
    finite = lambda v: None if isinstance(v, float) and not np.isfinite(v) else v  # noqa: E731
    rows = [{k: finite(v) for k, v in r.items()} for r in rows]
    report = {
        "panel": PANEL,
        "steps": args.steps,
        "rows": rows,
        "reference": json.loads(str(reference["config"])),
    }
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2)
    show = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
    print(
        "| method | sd / NUTS sd (median) | mean error (rms, NUTS sds) | 90% coverage | "
        "category sd / NUTS sd (median) | step time vs mean-field | products k-hat >= 0.7 |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        cells = [
            r["method"],
            show(r["sd_ratio_median"], ".2f"),
            show(r["mean_error_rms_nuts_sd"], ".2f"),
            show(r["coverage_90"], ".3f"),
            show(r["group_sd_ratio_median"], ".2f"),
            show(r["step_time_vs_meanfield"], ".2f") + ("x" if r["step_time_vs_meanfield"] else ""),
            show(r["unit_k_share"], ".1%"),
        ]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["reference", "compare"])
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--guides", default="unitblock,meanfield,lowrank")
    parser.add_argument("--dreg", action="store_true", help="also unitblock with DReG")
    parser.add_argument("--skip-numpyro", action="store_true")
    parser.add_argument(
        "--noncentred",
        default="meanfield,unitblock",
        help="guides also fitted with the article's non-centred hierarchy (with and without "
        "price centring)",
    )
    parser.add_argument("--out", default="benchmarks/results/nuts-validation.json")
    args = parser.parse_args()
    with jax.numpy_dtype_promotion("standard"):
        {"reference": reference, "compare": compare}[args.mode](args)


if __name__ == "__main__":
    main()
