"""hbjax vs the article's NumPyro code on one accelerator, phase by phase.

``python -m benchmarks.gpu`` (about 8 minutes on one H100): simulated panels of 10k, 100k
and 1M products x 156 weeks; for each size one process per framework, so that peak memory
is each framework's own. hbjax reports its host set-up in phases (``from_frame``: the
article's model of the table, ``grid``: placement, ``init_latents``: the start), then for
the mean-field and the default (unit-block) guide: compile seconds, the first chunk, steady
iterations/s (median of timed chunks), peak device memory; and the time to a converged fit
(10k and 1M: seconds of fitting, compile included, until the RMSE of the product
elasticities to the truth is within 5% of its value at the end of the budget). NumPyro:
set-up, compile, steady it/s, peak memory, the same convergence figure. ``--hlo`` adds
:func:`hbjax.vi.perf.program_report` of the step; ``--variants`` times the CPU-shaped kernels
on the accelerator too (sequential particles, unchunked cell sums), so a run says which
choice mattered.

Every figure is printed as a JSON line the moment it exists and appended to ``--out``
(default ``benchmarks/results/gpu.jsonl``): a run cut off early still reports. A run that
passes ``--run-timeout`` seconds is stopped and reported with the phase it was in.
Panels are simulated once per size and cached as Parquet under ``--cache``.

``--smoke``: tiny panels on whatever backend is there (CI checks the script on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_SIZES = "10000,100000,1000000"
CONVERGE_SIZES = "10000,1000000"


def emit(record: dict, out: str | None) -> None:
    """Print one JSON line now and append it to ``out``."""
    line = json.dumps(record, default=float)
    print(line, flush=True)
    if out:
        with open(out, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")


def peak_device_bytes() -> int | None:
    """Peak bytes in use on the first device (``None`` where the backend does not say)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def panel_files(cache: Path, products: int, periods: int) -> tuple[Path, Path]:
    """Parquet table and truth CSV of the simulated panel (simulated on first use)."""
    import hbjax

    cache.mkdir(parents=True, exist_ok=True)
    table = cache / f"panel-{products}x{periods}-seed0.parquet"
    truth = cache / f"panel-{products}x{periods}-seed0.truth.csv"
    if not (table.exists() and truth.exists()):
        sim = hbjax.simulate(n_units=products, n_periods=periods, seed=0)
        partial = table.with_suffix(".partial")
        sim.frame.to_parquet(partial)
        sim.truth.to_csv(truth, index=False)
        partial.rename(table)
    return table, truth


class _Clock:
    """Phase timer: ``clock.lap()`` returns the seconds since the previous lap."""

    def __init__(self) -> None:
        self.last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        return seconds


def hbjax_child(args: argparse.Namespace, base: dict) -> None:
    """One process: hbjax's set-up, speed of both guides, time to a converged fit."""
    import warnings

    import jax
    import numpy as np
    import pandas as pd

    import hbjax
    from hbjax.vi import perf

    warnings.simplefilter("ignore", hbjax.DataWarning)
    out, clock = args.out, _Clock()
    table, truth_file = panel_files(Path(args.cache), args.products, args.periods)
    frame = pd.read_parquet(table)
    record = {**base, "phase": "read_parquet", "seconds": clock.lap(), "rows": len(frame)}
    emit(record, out)
    data = hbjax.counts.elasticity_data(frame)
    del frame
    emit({**base, "phase": "from_frame", "seconds": clock.lap()}, out)
    model = data.model
    placed = jax.block_until_ready(data.grid(hbjax.make_mesh()))
    chunk = max(placed.cell_chunk.values(), default=1)
    emit({**base, "phase": "grid", "seconds": clock.lap(), "cell_chunk": placed.cell_chunk,
          "blocks": placed.n_blocks}, out)  # fmt: skip
    start = jax.block_until_ready(model.init_latents(data.rows))
    emit({**base, "phase": "init_latents", "seconds": clock.lap()}, out)
    truth = pd.read_csv(truth_file).set_index("product")
    truth = truth.loc[list(data.units), "elasticity"].to_numpy()
    key = jax.random.key(0)
    if args.hlo:
        guide = hbjax.make_guide("unitblock", model, loc=start)
        program = perf.step_program(model, guide, placed, key=key)
        report = perf.program_report(program)
        emit({**base, "phase": "program", "report": report.describe(),
              "scatters": report.scatters}, out)  # fmt: skip
    variants = [("meanfield", {}), ("unitblock", {})]
    if args.variants:  # the CPU shapes on this backend, for comparison
        variants += [("unitblock", {"particle_map": "sequential"})]
        if chunk not in (None, 1):
            variants += [("unitblock", {"cell_chunk": 1})]
    for guide_name, variant in variants:
        fitted = placed
        if "cell_chunk" in variant:
            fitted = data.grid(hbjax.make_mesh(), cell_chunk=variant["cell_chunk"])
        objective = None
        if "particle_map" in variant:
            objective = _with_particle_map(hbjax, variant["particle_map"])
        guide = hbjax.make_guide(guide_name, model, loc=start)
        steps = args.block * (args.blocks + 1)
        clock.lap()
        result = hbjax.fit(model, guide, fitted, key=key, steps=steps, chunk_size=args.block,
                           progress=False, objective=objective, convergence=None)  # fmt: skip
        chunks = np.asarray(result.chunk_seconds)
        emit({**base, "phase": "speed", "guide": guide_name, "variant": variant,
              "compile_seconds": result.compile_seconds, "first_chunk_seconds": float(chunks[0]),
              "iterations_per_second": args.block / float(np.median(chunks[1:])),
              "chunk_seconds": chunks.tolist(), "wall_seconds": clock.lap(),
              "peak_device_bytes": peak_device_bytes()}, out)  # fmt: skip
    if args.converge:
        _converge(hbjax, model, placed, start, truth, key, args, base)


def _with_particle_map(hbjax: object, how: str):  # noqa: ANN202
    def objective(model, guide, panel, *, key):  # noqa: ANN001, ANN202
        return hbjax.vi.objectives.renyi_elbo(model, guide, panel, key=key, particle_map=how)

    return objective


def _converge(hbjax, model, placed, start, truth, key, args, base) -> None:  # noqa: ANN001
    """Fit the default guide for ``--budget`` seconds; time to within 5% of the last RMSE."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    guide = hbjax.make_guide("unitblock", model, loc=start)
    trace, waited = [], [0.0]

    def record(steps: int, fitted: object) -> None:
        t = time.perf_counter()
        loc = jax.tree.map(jnp.asarray, fitted.loc)
        elasticity = np.asarray(model.unit_slopes(loc)["log_price"])
        rmse = float(np.sqrt(np.mean((elasticity - truth) ** 2)))
        trace.append([steps, t - begun - waited[0], rmse])
        waited[0] += time.perf_counter() - t

    probe = hbjax.fit(model, guide, placed, key=key, steps=args.block * 2,
                      chunk_size=args.block, progress=False, convergence=None)  # fmt: skip
    rate = probe.iterations_per_second
    steps = int(max(args.eval_every, min(args.max_steps, rate * args.budget)))
    steps -= steps % args.eval_every
    begun = time.perf_counter()
    hbjax.fit(model, guide, placed, key=key, steps=steps, chunk_size=args.eval_every,
              progress=False, callback=record, convergence=None)  # fmt: skip
    emit({**base, "phase": "converge", "guide": "unitblock", **_converged(trace)}, args.out)


def _converged(trace: list) -> dict:
    """Seconds until the RMSE first stays within 5% of its final value."""
    final = trace[-1][2]
    within = [row for row in trace if row[2] <= 1.05 * final]
    return {"steps": trace[-1][0], "final_rmse": final,
            "seconds_to_converged": within[0][1] if within else None,
            "trace": trace}  # fmt: skip


def numpyro_child(args: argparse.Namespace, base: dict) -> None:
    """One process: the article's NumPyro code, set-up, speed, time to a converged fit."""
    import jax
    import numpy as np
    import pandas as pd

    from benchmarks import article_numpyro as article

    out, clock = args.out, _Clock()
    table, truth_file = panel_files(Path(args.cache), args.products, args.periods)
    frame = pd.read_parquet(table)
    emit({**base, "phase": "read_parquet", "seconds": clock.lap(), "rows": len(frame)}, out)
    data = article.make_data(frame)
    svi, guide = article.make_svi(data)
    state = svi.init(jax.random.key(42), article.static_data(data), data["outcome"])
    jax.block_until_ready(state)
    emit({**base, "phase": "setup", "seconds": clock.lap()}, out)
    run = article.run_steps(svi, data, args.block)
    state, _ = jax.block_until_ready(run(state))
    first = clock.lap()
    blocks = []
    for _ in range(args.blocks):
        state, _ = jax.block_until_ready(run(state))
        blocks.append(clock.lap())
    block = float(np.median(blocks))
    emit({**base, "phase": "speed", "guide": "AutoNormal", "compile_seconds": first - block,
          "first_chunk_seconds": first, "iterations_per_second": args.block / block,
          "chunk_seconds": blocks, "peak_device_bytes": peak_device_bytes()}, out)  # fmt: skip
    if not args.converge:
        return
    truth = pd.read_csv(truth_file).set_index("product")
    truth = truth.loc[list(data["products"]), "elasticity"].to_numpy()
    run = article.run_steps(svi, data, args.eval_every)
    state = svi.init(jax.random.key(42), article.static_data(data), data["outcome"])
    trace, fitting, steps = [], 0.0, 0
    while steps < args.max_steps and fitting < args.budget:
        t = time.perf_counter()
        state, _ = jax.block_until_ready(run(state))
        fitting += time.perf_counter() - t
        steps += args.eval_every
        rmse = float(np.sqrt(np.mean((article.elasticities(guide, svi.get_params(state), data)
                                      - truth) ** 2)))  # fmt: skip
        trace.append([steps, fitting, rmse])
    emit({**base, "phase": "converge", "guide": "AutoNormal", **_converged(trace)}, out)


def _child_command(args: argparse.Namespace, framework: str, products: int) -> list[str]:
    command = [sys.executable, "-m", "benchmarks.gpu", "--child", framework,
               "--products", str(products), "--periods", str(args.periods),
               "--block", str(args.block), "--blocks", str(args.blocks),
               "--eval-every", str(args.eval_every), "--max-steps", str(args.max_steps),
               "--budget", str(args.budget), "--cache", args.cache]  # fmt: skip
    if args.out:
        command += ["--out", args.out]
    if str(products) in args.converge_sizes.split(","):
        command.append("--converge")
    command += ["--hlo"] * args.hlo + ["--variants"] * args.variants
    return command


def _run_child(command: list[str], timeout: float, base: dict, out: str | None) -> None:
    """Run one child, its lines going straight through; stop it past ``timeout``."""
    started = time.perf_counter()
    with subprocess.Popen(command, stdout=sys.stdout, stderr=subprocess.PIPE, text=True) as child:
        try:
            _, stderr = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            _, stderr = child.communicate()
            emit({**base, "phase": "timed_out", "seconds": time.perf_counter() - started}, out)
            return
    if child.returncode:
        tail = stderr.strip().splitlines()[-5:]
        emit({**base, "phase": "failed", "returncode": child.returncode, "stderr": tail}, out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="products, comma-separated")
    parser.add_argument("--converge-sizes", default=CONVERGE_SIZES)
    parser.add_argument("--periods", type=int, default=156)
    parser.add_argument("--frameworks", default="hbjax,numpyro")
    parser.add_argument("--block", type=int, default=50, help="steps per timed chunk")
    parser.add_argument("--blocks", type=int, default=4, help="timed chunks after the first")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--max-steps", type=int, default=20000)
    parser.add_argument("--budget", type=float, default=30.0, help="fitting seconds (converge)")
    parser.add_argument("--run-timeout", type=float, default=240.0, help="seconds per process")
    parser.add_argument("--out", default="benchmarks/results/gpu.jsonl")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "hbjax-bench"))
    parser.add_argument("--hlo", action="store_true", help="report the step's program")
    parser.add_argument("--variants", action="store_true", help="also time the CPU shapes")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script")
    parser.add_argument("--child", choices=["hbjax", "numpyro"], help=argparse.SUPPRESS)
    parser.add_argument("--products", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--converge", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        import jax

        base = {"framework": args.child, "products": args.products, "periods": args.periods,
                "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
                "devices": len(jax.devices()), "jax": jax.__version__}  # fmt: skip
        (hbjax_child if args.child == "hbjax" else numpyro_child)(args, base)
        return
    if args.smoke:
        if args.sizes == DEFAULT_SIZES:
            args.sizes, args.converge_sizes = "60,120", "60"
        args.periods = 12
        args.block, args.blocks, args.eval_every, args.budget = 5, 2, 5, 1.0
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    frameworks = [f for f in args.frameworks.split(",") if f]
    if "numpyro" in frameworks and not _importable("numpyro"):
        emit({"framework": "numpyro", "phase": "skipped", "why": "numpyro not installed"},
             args.out)  # fmt: skip
        frameworks.remove("numpyro")
    emit({"phase": "start", "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
          "commit": _commit()}, args.out)  # fmt: skip
    for products in (int(p) for p in args.sizes.split(",") if p):
        clock = _Clock()
        panel_files(Path(args.cache), products, args.periods)
        emit({"phase": "simulate", "products": products, "seconds": clock.lap()}, args.out)
        for framework in frameworks:
            base = {"framework": framework, "products": products}
            _run_child(_child_command(args, framework, products), args.run_timeout, base, args.out)


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=False, cwd=os.path.dirname(__file__))  # fmt: skip
    except OSError:
        return None
    return done.stdout.strip() or None


if __name__ == "__main__":
    main()
