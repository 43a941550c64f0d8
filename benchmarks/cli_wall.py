"""``hbjax fit`` of one table, wall time of the whole command: this tree against another.

Each run is a fresh process with the compilation cache off (a cold start, as a new user's
first fit), alternating the two trees; the other tree is put first on ``PYTHONPATH``
(e.g. a ``git worktree`` of an older commit). Reports the wall seconds, the fit's steps,
whether it converged and the RMSE and 90% coverage of the product elasticities against
the simulated truth.

Usage::

    git worktree add /tmp/old <commit>
    python -m benchmarks.cli_wall --products 10000 --periods 156 --other /tmp/old --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import pandas as pd

import hbjax


def run_fit(table: Path, out: Path, tree: str | None) -> dict:
    """One ``hbjax fit`` in a fresh process; ``tree``: a source tree to import hbjax from."""
    env = dict(os.environ, HBJAX_COMPILATION_CACHE="0")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([tree, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    command = [sys.executable, "-m", "hbjax.cli", "fit", str(table), "--out", str(out)]
    start = time.perf_counter()
    # run from the table's folder: ``python -m`` puts the working directory first on
    # sys.path, which would shadow PYTHONPATH's tree with a checkout run from its root
    done = subprocess.run(
        [*command, "--no-progress"], env=env, capture_output=True, text=True, cwd=table.parent
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    summary = json.loads((out / "summary.json").read_text())
    return {"wall_seconds": wall, "steps": summary["steps"], "converged": summary["converged"]}


def recovery(out: Path, truth: pd.DataFrame) -> dict:
    """RMSE and 90% coverage of the product elasticities against the truth."""
    units = pd.read_csv(out / "elasticities.csv").merge(truth, on=["product", "category"])
    error = units["mean"] - units["elasticity"]
    covered = (units["q05"] <= units["elasticity"]) & (units["elasticity"] <= units["q95"])
    return {"rmse": float(np.sqrt(np.mean(error**2))), "coverage": float(covered.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=10_000)
    parser.add_argument("--periods", type=int, default=156)
    parser.add_argument("--other", required=True, help="the source tree to compare with")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="append JSON lines here")
    args = parser.parse_args()
    sim = hbjax.simulate(n_units=args.products, n_periods=args.periods, seed=0)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        table = Path(folder) / "panel.csv"
        sim.frame.to_csv(table, index=False)
        truth = sim.truth[["product", "category", "elasticity"]].astype({"product": str})
        for repeat in range(args.repeats):
            for name, tree in (("other", args.other), ("this", None)):
                out = Path(folder) / f"{name}-{repeat}"
                row = {"tree": name, "repeat": repeat, **run_fit(table, out, tree)}
                row |= recovery(out, truth)
                print(json.dumps(row), flush=True)
                rows.append(row)
    for name in ("other", "this"):
        walls = [r["wall_seconds"] for r in rows if r["tree"] == name]
        print(f"{name}: median {statistics.median(walls):.1f} s over {len(walls)} runs")
    if args.out:
        meta = {
            "products": args.products,
            "periods": args.periods,
            "jax": jax.__version__,
            "machine": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
        }
        with open(args.out, "a") as sink:
            for row in rows:
                sink.write(json.dumps({**meta, **row}) + "\n")


if __name__ == "__main__":
    main()
