"""The article's model through the vocabulary (hbjax.counts) against ElasticityModel.

Both fit the same simulated panel with the same guide family, objective and optimiser;
the figure is steps per second after compilation (``FitResult.iterations_per_second``),
alternating the two and repeating, medians reported. ElasticityModel runs its default
layout (``auto``: Poisson sufficient statistics when they pay) and the rows layout, the
vocabulary its grid (:meth:`hbjax.counts.CountData.grid`) and its rows
(:class:`hbjax.UnitRows`).

Usage::

    python -m benchmarks.vocabulary --products 2000 --periods 52 --steps 1000 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax

import hbjax
from hbjax.counts import elasticity_data


def _fits(products: int, periods: int, groups: int) -> dict:
    sim = hbjax.simulate(n_units=products, n_periods=periods, n_groups=groups, seed=0)
    panel, _ = hbjax.from_frame(sim.frame)
    reference = hbjax.ElasticityModel.from_panel(panel)
    data = elasticity_data(sim.frame)
    mesh = hbjax.make_mesh()
    return {
        "ElasticityModel (auto layout)": (reference, hbjax.shard_panel(panel, mesh), panel),
        "ElasticityModel (rows layout)": (
            reference,
            hbjax.shard_panel(panel, mesh, layout="rows"),
            panel,
        ),
        "vocabulary (CountRegression grid)": (data.model, data.grid(mesh), data.rows),
        "vocabulary (CountRegression rows)": (
            data.model,
            hbjax.shard_rows(data.rows, mesh),
            data.rows,
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=2000)
    parser.add_argument("--periods", type=int, default=52)
    parser.add_argument("--groups", type=int, default=20)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--guide", default="meanfield", help="the guide family of every fit")
    parser.add_argument("--out", default=None, help="append the figures here (JSON lines)")
    args = parser.parse_args()
    fits = _fits(args.products, args.periods, args.groups)
    speeds: dict[str, list[float]] = {name: [] for name in fits}
    for repeat in range(args.repeats):
        for name, (model, placed, host) in fits.items():
            guide = hbjax.make_guide(args.guide, model, loc=model.init_latents(host))
            with jax.numpy_dtype_promotion("standard"):
                result = hbjax.fit(
                    model,
                    guide,
                    placed,
                    key=jax.random.key(repeat),
                    steps=args.steps,
                    convergence=None,
                    progress=False,
                )
            speeds[name].append(result.iterations_per_second)
            print(
                f"repeat {repeat}: {name}: {result.iterations_per_second:.1f} steps/s", flush=True
            )
    base = statistics.median(speeds["ElasticityModel (auto layout)"])
    record = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {jax.devices()[0].device_kind} x{jax.device_count()}",
        "jax": jax.__version__,
        "products": args.products,
        "periods": args.periods,
        "steps": args.steps,
        "guide": args.guide,
        "median steps/s": {k: statistics.median(v) for k, v in speeds.items()},
        "ratio to ElasticityModel (auto)": {
            k: statistics.median(v) / base for k, v in speeds.items()
        },
    }
    print(json.dumps(record, indent=1))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
