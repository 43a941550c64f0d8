"""The largest panel this machine fits, with and without minibatching.

Usage::

    python -m benchmarks.largest_panel full --products 12500,25000,50000,100000
    python -m benchmarks.largest_panel write --products 7000000 --file /data/big.parquet
    python -m benchmarks.largest_panel minibatch --file /data/big.parquet --grid /data/grid

``full``: the full-batch pipeline as a user runs it (``hbjax fit FILE``: read the table,
validate, place, fit, summarise) on P products x 156 weeks (``hbjax simulate``: text
labels), or on the given ``--files`` (e.g. from ``write``), each in a fresh process;
reports its peak resident memory and fits ``peak = a + b * observations`` to extrapolate
the largest table that fits in this machine's memory.

``write``: a big Parquet table, simulated in chunks of 100k products (each chunk its own
categories and truth, integer product labels), never held whole; the truth goes to
``FILE.truth.npy`` (elasticity by product label).

``minibatch``: ``hbjax prepare`` (streamed, two passes) then a minibatch fit with the
Python API on the memory-mapped rows; reports time, speed, epochs, peak anonymous
memory (sampled every 0.2 s; the grid's pages are file-backed and reclaimable) and the
RMSE of the fitted elasticities (guide means on the natural scale) to the truth.

Each step prints a JSON line and appends it to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

PERIODS = 156


def _status_mib(field: str) -> float:
    """A field of ``/proc/self/status`` in MiB (``RssAnon``, ``RssFile``)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


CHUNK_PRODUCTS = 100_000


class PeakAnon:
    """Peak anonymous resident memory of this process, sampled in a thread."""

    def __init__(self, every: float = 0.2):
        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status_mib("RssAnon"))
            time.sleep(every)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _status_mib("RssAnon"))


def _record(args: argparse.Namespace, report: dict) -> None:
    print(json.dumps(report), flush=True)
    with open(args.out, "a") as handle:
        handle.write(json.dumps(report) + "\n")


def _child(code: str, *argv: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, check=False
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"ok": False, "exit": done.returncode, "error": done.stderr.strip()[-400:]}
    return json.loads(lines[-1])


_FULL_CHILD = """
import json, resource, sys, time
from hbjax.cli import main
start = time.perf_counter()
rc = main(sys.argv[1:])
print(json.dumps({"ok": rc == 0, "seconds": time.perf_counter() - start,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def full(args: argparse.Namespace) -> None:
    import numpy as np

    work = args.work
    os.makedirs(work, exist_ok=True)
    points = []
    import pyarrow.parquet as pq

    tables = [] if not args.files else args.files.split(",")
    for products in [] if tables else [int(p) for p in args.products.split(",")]:
        tables.append(os.path.join(work, f"full-{products}.parquet"))
        if not os.path.exists(tables[-1]):
            command = ["hbjax", "simulate", "--products", str(products), "--out", tables[-1]]
            subprocess.run(command, check=True)
    for path in tables:
        meta = pq.ParquetFile(path)
        rows = meta.metadata.num_rows
        labels = str(meta.schema_arrow.field("product").type)
        products = len(pq.read_table(path, columns=["product"]).column(0).unique())
        command = ["fit", path, "--steps", str(args.steps), "--samples", "100", "--no-progress"]
        report = _child(_FULL_CHILD, *command, "--out", os.path.join(work, "full-out"))
        report.update(
            step="full batch (hbjax fit FILE)",
            file=path,
            product_labels=labels,
            products=products,
            observations=rows,
        )
        _record(args, report)
        if report.get("ok"):
            points.append((rows, report["peak_rss_mib"]))
    if len(points) >= 2:
        obs, peak = np.array(points, dtype=float).T
        slope, intercept = np.polyfit(obs, peak, 1)
        total_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
        usable = total_mib - 1024  # leave 1 GiB to the system
        _record(
            args,
            {
                "step": "full batch: linear fit of peak RSS",
                "mib_per_million_obs": slope * 1e6,
                "fixed_mib": intercept,
                "machine_mib": total_mib,
                "largest_obs_estimate": (usable - intercept) / slope,
            },
        )


def write(args: argparse.Namespace) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    import hbjax

    start = time.perf_counter()
    products = int(args.products)
    truth = np.empty(products)
    writer, rows = None, 0
    for k, first in enumerate(range(0, products, CHUNK_PRODUCTS)):
        n = min(CHUNK_PRODUCTS, products - first)
        sim = hbjax.simulate(n_units=n, n_periods=PERIODS, seed=1000 + k)
        frame = sim.frame
        codes, _ = __import__("pandas").factorize(frame["product"])  # sorted by product
        category = frame["category"].str[1:].astype(np.int64).to_numpy() + 100 * k
        table = pa.table(
            {
                "product": codes.astype(np.int64) + first,
                "category": category,
                "period": frame["period"].to_numpy(),
                "price": frame["price"].to_numpy(),
                "units_sold": frame["units_sold"].to_numpy(),
            }
        )
        if writer is None:
            writer = pq.ParquetWriter(args.file, table.schema)
        writer.write_table(table, row_group_size=1_000_000)
        truth[first : first + n] = sim.truth["elasticity"].to_numpy()
        rows += len(frame)
        print(f"chunk {k}: {first + n} products, {rows} rows", file=sys.stderr, flush=True)
    assert writer is not None
    writer.close()
    np.save(args.file + ".truth.npy", truth)
    _record(
        args,
        {
            "step": "write table",
            "products": products,
            "observations": rows,
            "file_mib": os.path.getsize(args.file) / 2**20,
            "seconds": time.perf_counter() - start,
        },
    )


_PREPARE_CHILD = """
import json, resource, sys, time
from hbjax.cli import main
start = time.perf_counter()
rc = main(["prepare", sys.argv[1], "--out", sys.argv[2], "--no-progress"])
print(json.dumps({"ok": rc == 0, "seconds": time.perf_counter() - start,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def minibatch(args: argparse.Namespace) -> None:
    if not args.reuse_grid:
        report = _child(_PREPARE_CHILD, args.file, args.grid)
        report.update(step="prepare (streamed; hbjax prepare FILE --out DIR)")
        _record(args, report)
    command = [sys.executable, "-m", "benchmarks.largest_panel", "fit-child"]
    command += [f"--file={args.file}", f"--grid={args.grid}", f"--out={args.out}"]
    command += [f"--batch-size={args.batch_size}", f"--epochs={args.epochs}"]
    command += [f"--guide={args.guide}"]
    subprocess.run(command, check=True)


def fit_child(args: argparse.Namespace) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import hbjax

    peak = PeakAnon()
    start = time.perf_counter()
    data = hbjax.counts.elasticity_data(args.grid)  # the prepared folder: rows on disk
    config = hbjax.counts.FitConfig(
        batch_size=args.batch_size,
        steps=round(args.epochs * len(data.units) / args.batch_size),
        guide=args.guide,
        progress=False,
    )
    result = hbjax.counts.fit_counts(data, config)
    loc = jax.tree.map(jnp.asarray, result.guide.loc)
    beta = np.asarray(data.model.unit_slopes(loc)["log_price"])
    labels = data.units.to_numpy().astype(np.int64)
    truth = np.load(args.file + ".truth.npy")[labels]
    on_disk = sum(np.asarray(x).nbytes for x in jax.tree.leaves(data.rows))
    _record(
        args,
        {
            "step": "minibatch fit (memory-mapped rows)",
            "guide": args.guide,
            "products": len(data.units),
            "observations": len(data.rows.unit),
            "rows_gib": on_disk / 2**30,
            "batch_size": result.batch_size,
            "steps": result.steps,
            "epochs": result.epochs,
            "iterations_per_second": result.iterations_per_second,
            "fit_seconds": result.wall_seconds,
            "total_seconds": time.perf_counter() - start,
            "rmse": float(np.sqrt(np.mean((beta - truth) ** 2))),
            "truth_sd": float(np.std(truth)),
            "peak_anon_mib": peak.stop(),
            "peak_rss_mib_incl_file_pages": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            / 1024,
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["full", "write", "minibatch", "fit-child"])
    parser.add_argument("--products", default="12500,25000,50000,100000")
    parser.add_argument("--files", default="", help="full: comma-separated tables to fit")
    parser.add_argument("--steps", type=int, default=100, help="full-batch steps")
    parser.add_argument("--work", default="/tmp/hbjax-largest")
    parser.add_argument("--file", default="/tmp/hbjax-largest/big.parquet")
    parser.add_argument("--grid", default="/tmp/hbjax-largest/grid")
    parser.add_argument("--batch-size", type=int, default=40000)
    parser.add_argument("--epochs", type=float, default=20.0)
    parser.add_argument("--reuse-grid", action="store_true")
    parser.add_argument("--guide", default="unitblock", help="minibatch fit's guide")
    parser.add_argument("--out", default="benchmarks/results/largest-panel.jsonl")
    args = parser.parse_args()
    {"full": full, "write": write, "minibatch": minibatch, "fit-child": fit_child}[args.mode](args)


if __name__ == "__main__":
    main()
