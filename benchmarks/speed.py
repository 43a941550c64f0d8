"""Steady-state speed of hbjax's default fit on a simulated panel.

Usage: ``python -m benchmarks.speed --products 10000 --periods 156 [--devices N]``
(``--devices N`` needs N devices: on CPU set
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` first).

Reports compile time and iterations/s (median of timed blocks after a warm-up), with the
CLI's default settings (mean-field guide, Rényi alpha=0, 4 particles, the article's adamw
schedule).
"""

import argparse
import json
import platform
import resource
import time

import jax
import numpy as np

import hbjax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=10000)
    parser.add_argument("--periods", type=int, default=156)
    parser.add_argument("--block", type=int, default=20, help="steps per timed block")
    parser.add_argument("--blocks", type=int, default=5, help="timed blocks")
    parser.add_argument("--layout", default="auto", choices=["auto", "dense", "rows"])
    parser.add_argument(
        "--devices", type=int, default=0, help="mesh size (0: no mesh, the plain kernel)"
    )
    args = parser.parse_args()

    sim = hbjax.simulate(n_units=args.products, n_periods=args.periods, seed=0)
    data = hbjax.counts.elasticity_data(sim.frame)
    model, panel = data.model, data.rows
    guide = hbjax.MeanFieldNormal.from_shapes(model.latent_shapes(), loc=model.init_latents(panel))
    if args.devices:
        mesh = hbjax.make_mesh(args.devices)
        grid = args.layout in ("auto", "dense")
        panel = data.grid(mesh) if grid else hbjax.shard_rows(panel, mesh)
    key = jax.random.key(0)
    warm = hbjax.fit(
        model,
        guide,
        panel,
        key=key,
        steps=args.block,
        chunk_size=args.block,
        progress=False,
        convergence=None,
    )
    rates = []
    for i in range(args.blocks):
        result = hbjax.fit(
            model,
            warm.guide,
            panel,
            key=jax.random.fold_in(key, i),
            steps=args.block,
            chunk_size=args.block,
            progress=False,
            convergence=None,
        )
        rates.append(result.iterations_per_second)
    report = {
        "products": args.products,
        "periods": args.periods,
        "observations": int(np.sum(panel.unit_rows)),
        "layout": type(panel).__name__,
        "compile_seconds": round(warm.compile_seconds, 2),
        "iterations_per_second": round(float(np.median(rates)), 1),
        "devices": args.devices,
        "padded_cells": int(np.size(panel.log_price)),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "backend": jax.default_backend(),
        "machine": platform.machine(),
        "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
