"""hbjax vs the article's NumPyro set-up, side by side in one run.

Usage::

    pip install -e ".[bench]"
    python -m benchmarks.run                      # the full table (about 30 min on 2 cores)
    python -m benchmarks.run --sizes 1000 --repeats 1 --converge-budget 60   # a quick look

Each measurement runs in its own process (:mod:`benchmarks.one`), so peak memory is that
framework's alone; speed runs alternate hbjax / NumPyro and repeat, and the table reports
medians. Prints a markdown table and writes all raw figures to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time

import numpy as np


def measure(framework: str, products: int, mode: str, extra: list[str]) -> dict:
    command = [
        sys.executable,
        "-m",
        "benchmarks.one",
        "--framework",
        framework,
        "--products",
        str(products),
        "--mode",
        mode,
        *extra,
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {
            "framework": framework,
            "products": products,
            "mode": mode,
            "error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed",
        }
    return json.loads(done.stdout.strip().splitlines()[-1])


def seconds_to(trace: list, target: float) -> float | None:
    """Fitting seconds until the RMSE first falls within 5% of ``target``."""
    for _, seconds, error in trace:
        if error <= 1.05 * target:
            return seconds
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--repeats", type=int, default=3, help="speed runs per framework")
    parser.add_argument("--converge-sizes", default="1000,10000")
    parser.add_argument(
        "--converge-budget",
        type=float,
        default=600.0,
        help="seconds of fitting per convergence run",
    )
    parser.add_argument("--converge-steps", type=int, default=20000)
    parser.add_argument(
        "--skip-numpyro-above",
        type=int,
        default=100000,
        help="products above which NumPyro is not run",
    )
    parser.add_argument(
        "--minibatch",
        default="",
        help="converge runs of hbjax minibatch, as PRODUCTS:BATCH[,PRODUCTS:BATCH]",
    )
    parser.add_argument("--hbjax-eval-every", type=int, default=50)
    parser.add_argument("--out", default="benchmarks/results.json")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    converge_sizes = [int(s) for s in args.converge_sizes.split(",") if s]
    frameworks = lambda p: ["hbjax"] + (["numpyro"] if p <= args.skip_numpyro_above else [])  # noqa: E731
    results: dict = {
        "speed": [],
        "converge": [],
        "machine": platform.platform(),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
    }

    for products in sizes:
        for _ in range(args.repeats):
            for framework in frameworks(products):
                row = measure(framework, products, "speed", [])
                results["speed"].append(row)
                print(json.dumps(row), file=sys.stderr)
    budget = ["--budget", str(args.converge_budget), "--max-steps", str(args.converge_steps)]
    hbjax_eval = ["--eval-every", str(args.hbjax_eval_every)]
    minibatch = [
        tuple(int(v) for v in item.split(":")) for item in args.minibatch.split(",") if item
    ]
    runs = [(p, f, []) for p in converge_sizes for f in frameworks(p)]
    runs += [(p, "hbjax", ["--batch-size", str(b)]) for p, b in minibatch]
    for products, framework, extra in runs:
        extra = extra + (hbjax_eval if framework == "hbjax" else [])
        row = measure(framework, products, "converge", budget + extra)
        results["converge"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "trace"}), file=sys.stderr)
        if framework == "hbjax" and not extra[:1] == ["--batch-size"]:
            row = measure("hbjax", products, "converged", [])
            results.setdefault("converged", []).append(row)
            print(json.dumps(row), file=sys.stderr)
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=1)

    print(
        "| products | observations | framework | compile (s) | it/s (median) | "
        "hbjax / NumPyro | peak RSS (MiB) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for products in sizes:
        rows = {
            f: [
                r
                for r in results["speed"]
                if r["products"] == products and r["framework"] == f and "error" not in r
            ]
            for f in ("hbjax", "numpyro")
        }
        speed = {
            f: float(np.median([r["iterations_per_second"] for r in rs]))
            for f, rs in rows.items()
            if rs
        }
        for framework, rs in rows.items():
            if not rs:
                continue
            ratio = (
                f"{speed['hbjax'] / speed['numpyro']:.1f}x"
                if framework == "hbjax" and "numpyro" in speed
                else ""
            )
            print(
                f"| {products} | {rs[0]['observations']} | {framework} | "
                f"{np.median([r['compile_seconds'] for r in rs]):.1f} | {speed[framework]:.1f}"
                f" | {ratio} | {max(r['peak_rss_mib'] for r in rs):.0f} |"
            )

    print(
        "\n| products | framework | steps run | final RMSE | s to within 5% of own final | "
        "s to within 5% of hbjax's final | ratio (NumPyro / hbjax) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for products in dict.fromkeys(converge_sizes + [p for p, _ in minibatch]):
        rows = {
            r["framework"]: r
            for r in results["converge"]
            if r["products"] == products and "trace" in r
        }
        if "hbjax" not in rows:
            continue
        target = rows["hbjax"]["trace"][-1][2]
        times = {}
        for framework, row in sorted(rows.items(), key=lambda kv: kv[0] == "numpyro"):
            trace = row["trace"]
            own = seconds_to(trace, trace[-1][2])
            common = seconds_to(trace, target)
            times[framework] = common
            shown = f"{common:.1f}" if common is not None else f"> {trace[-1][1]:.0f}"
            ratio = ""
            if framework.startswith("hbjax-minibatch") and common is not None:
                ratio = f"{common / times['hbjax']:.2f}x full batch's time"
            if framework == "numpyro":
                base = times["hbjax"]
                ratio = (
                    f"{common / base:.1f}x"
                    if common is not None
                    else f"> {trace[-1][1] / base:.1f}x"
                )
            print(
                f"| {products} | {framework} | {trace[-1][0]} | {trace[-1][2]:.3f} | "
                f"{own:.1f} | {shown} | {ratio} |"
            )
    converged_table(results)


def converged_table(results: dict) -> None:
    """hbjax's default fit, stopping when converged, against NumPyro's trace to its RMSE."""
    print(
        "\n| products | hbjax: steps (converged) | hbjax: s, compile included | hbjax RMSE | "
        "NumPyro: s to within 5% of it | NumPyro / hbjax |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for row in results.get("converged", []):
        if "error" in row:
            continue
        numpyro = [
            r
            for r in results["converge"]
            if r["products"] == row["products"] and r["framework"] == "numpyro" and "trace" in r
        ]
        seconds = seconds_to(numpyro[0]["trace"], row["rmse"]) if numpyro else None
        if not numpyro:
            shown = ratio = "not run"
        elif seconds is None:
            reached = numpyro[0]["trace"][-1][1]
            shown, ratio = f"> {reached:.0f}", f"> {reached / row['seconds']:.1f}x"
        else:
            shown, ratio = f"{seconds:.1f}", f"{seconds / row['seconds']:.1f}x"
        print(
            f"| {row['products']} | {row['steps']} ({row['converged']}) | {row['seconds']:.1f} | "
            f"{row['rmse']:.3f} | {shown} | {ratio} |"
        )


if __name__ == "__main__":
    main()
