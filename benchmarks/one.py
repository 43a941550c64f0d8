"""One benchmark measurement in a fresh process (so its peak memory is its own).

``python -m benchmarks.one --framework hbjax|numpyro --products P --mode speed|converge``
prints one JSON line. Called by :mod:`benchmarks.run`; see ``benchmarks/README.md``.

* ``speed``: compile time, then steady-state iterations/s as the median of ``--blocks``
  timed blocks of ``--block`` steps after a warm-up block; peak resident memory.
* ``converge``: fit in chunks, after each chunk the RMSE of the posterior-median product
  elasticities to the truth (evaluation time not counted), until ``--max-steps`` or
  ``--budget`` seconds of fitting.
* ``converged`` (hbjax only): the default fit (:func:`hbjax.counts.fit_counts`, all
  devices), which stops by itself once converged: its seconds (compile included), steps
  and the RMSE of its exact posterior means.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

import hbjax
from hbjax.counts.simulate import SimulatedPanel


def peak_rss_mib() -> float:
    """Peak resident memory of this process (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rmse(estimate: np.ndarray, truth: np.ndarray) -> float:
    return float(np.sqrt(np.mean((estimate - truth) ** 2)))


def hbjax_converged(sim: SimulatedPanel) -> dict:
    """``hbjax fit``'s fit with its defaults, to convergence."""
    data = hbjax.counts.elasticity_data(sim.frame)
    start = time.perf_counter()
    config = hbjax.counts.FitConfig(progress=False)
    result = hbjax.counts.fit_counts(data, config, mesh=hbjax.make_mesh())
    seconds = time.perf_counter() - start
    units = data.summary(result.guide)["log_price/unit"].reset_index(names="product")
    units = units.merge(sim.truth, on="product")
    return {
        "seconds": seconds,
        "steps": result.steps,
        "converged": result.converged,
        "compile_seconds": result.compile_seconds,
        "rmse": rmse(units["mean"].to_numpy(), units["elasticity"].to_numpy()),
    }


def hbjax_run(sim: SimulatedPanel, args: argparse.Namespace) -> dict:
    """The CLI's default path: all devices, default layout, data-informed start."""
    if args.mode == "converged":
        return hbjax_converged(sim)
    start = time.perf_counter()
    data = hbjax.counts.elasticity_data(sim.frame)
    model, panel = data.model, data.rows
    guide = hbjax.make_guide(args.guide, model, loc=model.init_latents(panel))
    if args.batch_size:  # minibatches: the rows stay on the host
        panel = hbjax.Minibatches(panel, args.batch_size)
    else:  # full batch: placed once on the grid
        panel = hbjax.FullBatch(data.grid(hbjax.make_mesh()))
    setup = time.perf_counter() - start
    truth = sim.truth.set_index("product").loc[list(data.units), "elasticity"].to_numpy()
    key = jax.random.key(0)
    if args.mode == "speed":
        steps = args.block * (args.blocks + 1)
        result = hbjax.fit(
            model,
            guide,
            panel,
            key=key,
            steps=steps,
            chunk_size=args.block,
            progress=False,
            convergence=None,
        )
        block_seconds = result.chunk_seconds[1:]
        return {
            "setup_seconds": setup,
            "compile_seconds": result.compile_seconds,
            "iterations_per_second": args.block / float(np.median(block_seconds)),
        }
    trace = []

    def record(steps: int, fitted: hbjax.AbstractGuide) -> None:
        elasticity = np.asarray(
            model.unit_slopes(jax.tree.map(jnp.asarray, fitted.loc))["log_price"]
        )
        trace.append([steps, time.perf_counter() - clock[0] - waited[0], rmse(elasticity, truth)])

    clock, waited = [time.perf_counter()], [0.0]
    steps = args.max_steps
    if args.budget:  # stop early: a fit of the steps that fit in the budget
        speed = hbjax.fit(
            model,
            guide,
            panel,
            key=key,
            steps=args.block * 3,
            chunk_size=args.block,
            progress=False,
            convergence=None,
        )
        rate = speed.iterations_per_second  # steps/s after compile (any chunk size)
        steps = int(min(steps, max(args.eval_every, rate * args.budget)))
        clock[0] = time.perf_counter()
    hbjax.fit(
        model,
        guide,
        panel,
        key=key,
        steps=steps,
        chunk_size=args.eval_every,
        progress=False,
        callback=record,
        convergence=None,
    )
    return {"setup_seconds": setup, "trace": trace}


def numpyro_run(sim: SimulatedPanel, args: argparse.Namespace) -> dict:
    """The article's NumPyro set-up (see benchmarks/article_numpyro.py)."""
    from benchmarks import article_numpyro as article

    start = time.perf_counter()
    data = article.make_data(sim.frame)
    svi, guide = article.make_svi(data)
    state = svi.init(jax.random.key(42), article.static_data(data), data["outcome"])
    setup = time.perf_counter() - start
    truth = sim.truth.set_index("product").loc[list(data["products"]), "elasticity"].to_numpy()
    if args.mode == "speed":
        run = article.run_steps(svi, data, args.block)
        first = time.perf_counter()
        state, losses = jax.block_until_ready(run(state))
        first = time.perf_counter() - first
        blocks = []
        for _ in range(args.blocks):
            t = time.perf_counter()
            state, losses = jax.block_until_ready(run(state))
            blocks.append(time.perf_counter() - t)
        block = float(np.median(blocks))
        return {
            "setup_seconds": setup,
            "compile_seconds": first - block,
            "iterations_per_second": args.block / block,
        }
    run = article.run_steps(svi, data, args.eval_every)
    trace, fitting, steps = [], 0.0, 0
    while steps < args.max_steps and (not args.budget or fitting < args.budget):
        t = time.perf_counter()
        state, losses = jax.block_until_ready(run(state))
        fitting += time.perf_counter() - t
        steps += args.eval_every
        elasticity = article.elasticities(guide, svi.get_params(state), data)
        trace.append([steps, fitting, rmse(elasticity, truth)])
    return {"setup_seconds": setup, "trace": trace}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framework", choices=["hbjax", "numpyro"], required=True)
    parser.add_argument("--products", type=int, required=True)
    parser.add_argument("--periods", type=int, default=156)
    parser.add_argument("--mode", choices=["speed", "converge", "converged"], default="speed")
    parser.add_argument("--block", type=int, default=20)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--max-steps", type=int, default=20000)
    parser.add_argument("--budget", type=float, default=0.0, help="seconds of fitting (0: none)")
    parser.add_argument("--batch-size", type=int, default=0, help="hbjax minibatch (0: full)")
    parser.add_argument("--guide", default="meanfield", help="hbjax guide (make_guide name)")
    args = parser.parse_args()
    sim = hbjax.simulate(n_units=args.products, n_periods=args.periods, seed=0)
    run = hbjax_run if args.framework == "hbjax" else numpyro_run
    report = {
        "framework": args.framework + (f"-minibatch-{args.batch_size}" if args.batch_size else ""),
        "products": args.products,
        "periods": args.periods,
        "observations": len(sim.frame),
        "mode": args.mode,
        **run(sim, args),
        "peak_rss_mib": peak_rss_mib(),
        "devices": len(jax.devices()),
        "backend": jax.default_backend(),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
