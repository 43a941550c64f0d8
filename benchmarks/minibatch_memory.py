"""A minibatch fit whose panel does not fit in the process's memory cap.

Usage::

    python -m benchmarks.minibatch_memory --products 300000 --cap-mib 768

1. Preparation (no cap): simulate ``products x periods``, validate it (``from_frame``) and
   write (a) the host grid and block plan for :meth:`hbjax.minibatch.UnitSampler.load`,
   (b) the per-unit sums the model needs, and (c) the panel's observation arrays as
   ``.npy`` files.
2. Minibatch fit in a child process whose data segment is capped (``RLIMIT_DATA``: every
   private allocation, NumPy's and XLA's, counts; a read-only memory map does not): it
   memory-maps the grid, fits with ``batch_size`` and reports speed, epochs, recovery and
   peak memory.
3. Full-batch fit in a child with the same cap: it must load the observation arrays,
   which are larger than the cap, and fails.

Prints a JSON line per step and writes them to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def prepare(args: argparse.Namespace) -> dict:
    import numpy as np

    import hbjax
    from hbjax.minibatch import UnitSampler, UnitStats

    start = time.perf_counter()
    sim = hbjax.simulate(n_units=args.products, n_periods=args.periods, seed=0)
    panel, encoding = hbjax.from_frame(sim.frame)
    grid = os.path.join(args.work, "grid")
    sampler = UnitSampler(panel, args.batch_size, memmap_dir=grid)
    sampler.save(grid)
    stats = UnitStats.gather(panel)
    np.save(os.path.join(args.work, "moments.npy"), np.asarray(stats.moments))
    truth = sim.truth.set_index("product").loc[list(encoding.units), "elasticity"].to_numpy()
    np.save(os.path.join(args.work, "truth.npy"), truth)
    observations = {}
    for name in ("unit_idx", "cell_idx", "log_price", "counts", "weight"):
        value = np.asarray(getattr(panel, name))
        np.save(os.path.join(args.work, f"obs_{name}.npy"), value)
        observations[name] = value.nbytes
    meta = {
        "n_units": panel.n_units,
        "n_groups": panel.n_groups,
        "n_periods": panel.n_periods,
        "unit_group": np.asarray(panel.unit_group).tolist(),
    }
    with open(os.path.join(args.work, "panel.json"), "w") as handle:
        json.dump(meta, handle)
    report = {
        "step": "prepare",
        "products": panel.n_units,
        "observations": int(np.sum(panel.unit_rows)),
        "observation_array_mib": sum(observations.values()) / 2**20,
        "host_grid_mib": sampler.host_bytes() / 2**20,
        "seconds": time.perf_counter() - start,
    }
    with open(os.path.join(args.work, "prepare.json"), "w") as handle:
        json.dump(report, handle)
    return report


def _model_and_guide(work: str):  # noqa: ANN202
    import numpy as np

    import hbjax
    from hbjax.minibatch import UnitStats

    with open(os.path.join(work, "panel.json")) as handle:
        meta = json.load(handle)
    unit_group = np.asarray(meta["unit_group"], np.int32)
    stats = UnitStats(
        np.load(os.path.join(work, "moments.npy")),
        unit_group,
        meta["n_units"],
        meta["n_groups"],
        meta["n_periods"],
    )
    model = hbjax.ElasticityModel.from_panel(stats)
    guide = hbjax.MeanFieldNormal.from_shapes(model.latent_shapes(), loc=model.init_latents(stats))
    return model, guide, meta


def minibatch(args: argparse.Namespace) -> dict:
    import jax
    import numpy as np

    import hbjax
    from hbjax.minibatch import UnitSampler, seed_from_key

    model, guide, _ = _model_and_guide(args.work)
    key = jax.random.key(0)
    sampler = UnitSampler.load(
        os.path.join(args.work, "grid"), args.batch_size, seed=seed_from_key(key)
    )
    with jax.numpy_dtype_promotion("standard"):
        result = hbjax.fit(
            model, guide, sampler, key=key, steps=args.steps, progress=False, convergence=None
        )
    beta = np.asarray(model.natural(result.guide.loc).unit_elasticity)
    truth = np.load(os.path.join(args.work, "truth.npy"))
    return {
        "step": "minibatch fit",
        "cap_mib": args.cap_mib,
        "batch_size": result.batch_size,
        "steps": result.steps,
        "epochs": result.epochs,
        "iterations_per_second": result.iterations_per_second,
        "compile_seconds": result.compile_seconds,
        "wall_seconds": result.wall_seconds,
        "rmse": float(np.sqrt(np.mean((beta - truth) ** 2))),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_anon_mib_at_end": _status_mib("RssAnon"),
        "rss_file_mib_at_end": _status_mib("RssFile"),
        "vm_data_mib_at_end": _status_mib("VmData"),
    }


def full_batch(args: argparse.Namespace) -> dict:
    import jax
    import numpy as np

    import hbjax

    model, guide, meta = _model_and_guide(args.work)
    try:
        rows = {
            name: np.load(os.path.join(args.work, f"obs_{name}.npy"))
            for name in ("unit_idx", "cell_idx", "log_price", "counts", "weight")
        }
        unit_rows = np.bincount(rows["unit_idx"], minlength=meta["n_units"]).astype(np.int32)
        panel = hbjax.Panel(
            **rows,
            unit_group=np.asarray(meta["unit_group"], np.int32),
            unit_rows=unit_rows,
            n_units=meta["n_units"],
            n_groups=meta["n_groups"],
            n_periods=meta["n_periods"],
        )
        with jax.numpy_dtype_promotion("standard"):
            result = hbjax.fit(model, guide, panel, key=jax.random.key(0), steps=20)
    except (MemoryError, jax.errors.JaxRuntimeError) as error:
        return {
            "step": "full-batch fit",
            "cap_mib": args.cap_mib,
            "ok": False,
            "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}",
        }
    return {"step": "full-batch fit", "cap_mib": args.cap_mib, "ok": True, "steps": result.steps}


def child(args: argparse.Namespace, mode: str) -> dict:
    command = [sys.executable, "-m", "benchmarks.minibatch_memory", "--child", mode]
    command += [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("child", "reuse")
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = done.stderr.strip().splitlines()[-3:]
        return {
            "step": mode,
            "cap_mib": args.cap_mib,
            "ok": False,
            "exit": done.returncode,
            "error": " | ".join(tail),
        }
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=300000)
    parser.add_argument("--periods", type=int, default=156)
    parser.add_argument("--batch-size", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--cap-mib", type=int, default=768)
    parser.add_argument("--work", default="/tmp/hbjax-minibatch-memory")
    parser.add_argument("--out", default="benchmarks/results/minibatch-memory.json")
    parser.add_argument("--child", default="")
    parser.add_argument("--reuse", action="store_true", help="reuse a prepared --work folder")
    args = parser.parse_args()
    if args.child:
        cap = args.cap_mib * 2**20
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
        run = {"minibatch": minibatch, "full": full_batch}[args.child]
        print(json.dumps(run(args)))
        return
    os.makedirs(args.work, exist_ok=True)
    rows = []
    reuse = os.path.join(args.work, "prepare.json")
    if args.reuse and os.path.exists(reuse):
        with open(reuse) as handle:
            prepared = json.load(handle)
        prepare_step = lambda: prepared  # noqa: E731
    else:
        prepare_step = lambda: child_prepare(args)  # noqa: E731
    for step in (
        prepare_step,
        lambda: child(args, "minibatch"),
        lambda: child(args, "full"),
    ):
        rows.append(step())
        print(json.dumps(rows[-1]), flush=True)
    with open(args.out, "w") as handle:
        json.dump(
            {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "rows": rows},
            handle,
            indent=1,
        )


def child_prepare(args: argparse.Namespace) -> dict:
    """Preparation in its own (uncapped) process, so its memory is gone afterwards."""
    code = (
        "import json, argparse; from benchmarks.minibatch_memory import prepare; "
        f"print(json.dumps(prepare(argparse.Namespace(**{vars(args)!r}))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
