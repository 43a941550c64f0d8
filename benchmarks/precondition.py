"""Steps in posterior sds against the article's AdamW: steps to the stop, wall, accuracy.

Usage::

    python -m benchmarks.precondition --products 10000 --weeks 156 --seeds 0
    python -m benchmarks.precondition --products 60 --weeks 30 --groups 3 --mean-units 5000

Fits ``hbjax.simulate`` panels with :func:`hbjax.counts.fit_counts` twice per seed, in one
process: the default (``precondition=True`` at the default rate) and the article's optimiser
(``precondition=False``, lr 0.01), and prints steps, whether the fit stopped by itself,
seconds (compile included), the largest watched MCSE, and the product elasticities' RMSE
against the truth and 90% coverage. One JSON line per fit to ``--results``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np

import hbjax
from hbjax.counts import FitConfig, elasticity_data, fit_counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=10000)
    parser.add_argument("--weeks", type=int, default=156)
    parser.add_argument("--groups", type=int, default=20)
    parser.add_argument("--mean-units", type=float, default=None)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--results", default="benchmarks/results/precondition.jsonl")
    args = parser.parse_args()
    warnings.simplefilter("ignore", hbjax.ConvergenceWarning)
    extra = {} if args.mean_units is None else {"mean_units": args.mean_units}
    for seed in (int(s) for s in args.seeds.split(",")):
        sim = hbjax.simulate(
            n_units=args.products, n_periods=args.weeks, n_groups=args.groups, seed=seed, **extra
        )
        data = elasticity_data(sim.frame)
        truth = sim.truth["elasticity"].to_numpy()
        for precondition, lr in ((True, FitConfig().learning_rate), (False, 0.01)):
            config = FitConfig(
                steps=args.steps, progress=False, learning_rate=lr, precondition=precondition
            )
            start = time.perf_counter()
            result = fit_counts(data, config)
            seconds = time.perf_counter() - start
            units = data.summary(result.guide)["log_price/unit"].loc[sim.truth["product"]]
            mean, q05, q95 = (units[c].to_numpy() for c in ("mean", "q05", "q95"))
            line = {
                "products": args.products,
                "weeks": args.weeks,
                "mean_units": args.mean_units,
                "seed": seed,
                "precondition": precondition,
                "learning_rate": lr,
                "steps": result.steps,
                "converged": result.converged,
                "seconds": round(seconds, 1),
                "mcse_max": round(result.convergence.mcse_max or float("nan"), 3),
                "rmse": round(float(np.sqrt(np.mean((mean - truth) ** 2))), 4),
                "coverage90": round(float(np.mean((q05 <= truth) & (truth <= q95))), 3),
            }
            print(json.dumps(line), flush=True)
            with open(args.results, "a") as handle:
                handle.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
