"""``python -m benchmarks.gpu --smoke``: the GPU benchmark script runs and reports each phase."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_smoke_reports_every_phase(tmp_path):
    out = tmp_path / "gpu.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--smoke", "--frameworks", "hbjax",
         "--sizes", "60", "--converge-sizes", "60", "--hlo", "--out", str(out),
         "--cache", str(tmp_path / "cache")],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert done.stdout.count("\n") == len(records)  # printed as it went, and appended
    phases = [r["phase"] for r in records]
    for phase in ("start", "simulate", "from_frame", "grid", "init_latents", "program",
                  "converge"):  # fmt: skip
        assert phase in phases, (phase, phases)
    assert "failed" not in phases and "timed_out" not in phases
    speeds = [r for r in records if r["phase"] == "speed"]
    assert [r["guide"] for r in speeds] == ["meanfield", "unitblock"]
    for r in speeds:
        assert r["iterations_per_second"] > 0 and r["compile_seconds"] > 0
        assert len(r["chunk_seconds"]) == 3  # the first chunk and 2 timed ones
    placed = next(r for r in records if r["phase"] == "grid")
    assert set(placed["cell_chunk"].values()) == {1}  # CPU: no chunks (a GPU's: up to 64)
    program = next(r for r in records if r["phase"] == "program")
    assert "0 conditionals" in program["report"]
    converge = next(r for r in records if r["phase"] == "converge")
    assert math.isfinite(converge["final_rmse"]) and converge["seconds_to_converged"] > 0


def test_a_run_past_its_timeout_is_reported_with_its_phase(tmp_path):
    out = tmp_path / "gpu.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--smoke", "--frameworks", "hbjax",
         "--sizes", "60", "--run-timeout", "0.5", "--out", str(out),
         "--cache", str(tmp_path / "cache")],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records[-1]["phase"] == "timed_out" and records[-1]["products"] == 60
