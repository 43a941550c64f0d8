"""Do converged fits agree across seeds and device counts? (issue: fits that converge).

Fits one panel with the CLI's defaults (unit-block guide, centred, automatic stopping) for
seeds 0 and 1 on 1 device and seed 0 on N virtual CPU devices, and reports the median and
largest |difference of posterior means| / posterior sd of the product elasticities, the
steps taken and the wall time. Each fit runs in its own process (the device count is fixed
when JAX starts).

    python -m benchmarks.agreement --products 200 --periods 52 --devices 4  # the NUTS panel
    python -m benchmarks.agreement --products 2000 --panel-seed 0          # the demo's
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def one_fit(args: argparse.Namespace) -> None:
    """Child process: fit and print the unit summaries as JSON."""
    import jax

    import hbjax

    sim = hbjax.simulate(
        n_units=args.products, n_periods=args.periods, n_groups=10, seed=args.panel_seed
    )
    data = hbjax.counts.elasticity_data(sim.frame)
    model, panel = data.model, data.rows
    guide = hbjax.make_guide("unitblock", model, loc=model.init_latents(panel))
    start = time.perf_counter()
    with jax.numpy_dtype_promotion("standard"):
        result = hbjax.fit(
            model,
            guide,
            hbjax.FullBatch(panel, hbjax.make_mesh(args.devices)),
            key=jax.random.key(args.seed),
            steps=args.max_steps,
            progress=False,
        )
    units = data.summary(result.guide)["log_price/unit"]
    print(
        json.dumps(
            {
                "seed": args.seed,
                "devices": args.devices,
                "steps": result.steps,
                "wall_seconds": time.perf_counter() - start,
                "status": result.convergence.to_dict(),
                "mean": units["mean"].tolist(),
                "sd": units["sd"].tolist(),
                "truth": sim.truth.set_index("product").loc[data.units, "elasticity"].tolist(),
            }
        )
    )


def run(args: argparse.Namespace, seed: int, devices: int) -> dict:
    """One fit in a fresh process with ``devices`` virtual CPU devices."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    command = [sys.executable, "-m", "benchmarks.agreement", "--child", "--products",
               str(args.products), "--periods", str(args.periods), "--seed", str(seed),
               "--devices", str(devices), "--max-steps", str(args.max_steps),
               "--panel-seed", str(args.panel_seed)]  # fmt: skip
    with tempfile.TemporaryFile("w+") as log:
        out = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        if out.returncode:
            log.seek(0)
            raise RuntimeError(log.read()[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(a: dict, b: dict) -> dict:
    """Median and largest |difference of means| in posterior sd, and relative sd changes."""
    import numpy as np

    z = np.abs(np.asarray(a["mean"]) - np.asarray(b["mean"])) / np.asarray(a["sd"])
    sd = np.abs(np.log(np.asarray(b["sd"]) / np.asarray(a["sd"])))
    return {"median": float(np.median(z)), "max": float(z.max()),
            "sd_median_rel": float(np.median(sd)), "sd_max_rel": float(sd.max())}  # fmt: skip


def main() -> None:
    """Parse, fit three times, print the comparisons as JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=200)
    parser.add_argument("--periods", type=int, default=52)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--panel-seed", type=int, default=2026, help="simulation seed (2026: the NUTS panel)"
    )
    parser.add_argument("--max-steps", type=int, default=20000)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        one_fit(args)
        return
    import numpy as np

    fits = {
        "seed0": run(args, 0, 1),
        "seed1": run(args, 1, 1),
        f"devices{args.devices}": run(args, 0, args.devices),
    }
    for name, f in fits.items():
        rmse = float(np.sqrt(np.mean((np.asarray(f["mean"]) - np.asarray(f["truth"])) ** 2)))
        print(json.dumps({"fit": name, "steps": f["steps"], "wall_seconds": f["wall_seconds"],
                          "rmse": rmse, **f["status"]}))  # fmt: skip
    print(json.dumps({"compare": "seed 0 vs 1", **compare(fits["seed0"], fits["seed1"])}))
    print(json.dumps({"compare": f"1 vs {args.devices} devices",
                      **compare(fits["seed0"], fits[f"devices{args.devices}"])}))  # fmt: skip


if __name__ == "__main__":
    main()
