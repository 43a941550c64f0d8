import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from test_data import BAD_INPUTS, frame

import hbjax.cli
from hbjax.cli import main

pytestmark = pytest.mark.usefixtures("standard_promotion")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *words):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.fixture(scope="module")
def simulated_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "panel.csv"
    assert (
        main(
            [
                "simulate",
                "--products",
                "40",
                "--periods",
                "12",
                "--categories",
                "3",
                "--out",
                str(path),
            ]
        )
        == 0
    )
    return path


def test_simulate_writes_panel_and_truth(simulated_csv, tmp_path, capsys):
    df = pd.read_csv(simulated_csv)
    assert list(df.columns) == ["product", "category", "period", "price", "units_sold"]
    truth = pd.read_csv(str(simulated_csv) + ".truth.csv")
    assert list(truth.columns) == ["product", "category", "elasticity"] and len(truth) == 40
    code, out, _ = run(
        capsys,
        "simulate",
        "--products",
        "10",
        "--periods",
        "5",
        "--out",
        str(tmp_path / "p.parquet"),
    )
    assert code == 0 and len(pd.read_parquet(tmp_path / "p.parquet")) > 0


def test_fit_end_to_end_writes_outputs(simulated_csv, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, err = run(
        capsys,
        "fit",
        str(simulated_csv),
        "--steps",
        "60",
        "--samples",
        "50",
        "--out",
        str(out_dir),
        "--no-progress",
    )
    assert code == 0, err
    units = pd.read_csv(out_dir / "elasticities.csv")
    assert list(units.columns) == ["product", "category", "mean", "sd", "q05", "q50", "q95"]
    assert len(units) == 40
    groups = pd.read_csv(out_dir / "groups.csv")
    assert list(groups.columns) == ["category", "mean", "sd", "q05", "q50", "q95"]
    losses = pd.read_csv(out_dir / "losses.csv")
    assert list(losses.columns) == ["step", "loss"] and len(losses) == 60
    summary = json.loads((out_dir / "summary.json").read_text())
    for field in (
        "n_obs",
        "n_units",
        "n_groups",
        "steps",
        "final_loss",
        "wall_seconds",
        "iterations_per_second",
        "devices",
        "hbjax_version",
        "jax_version",
    ):
        assert field in summary, field
    assert summary["n_units"] == 40 and summary["steps"] == 60
    assert summary["converged"] is False and summary["summaries"].startswith("exact")
    assert summary["price_centring"] is True
    assert summary["guide"] == "unitblock" and summary["gradient"] == "dreg"
    assert summary["precondition"] is True and summary["learning_rate"] == 0.01
    check = summary["guide_check"]
    assert check["units_checked"] == 40 and check["draws_per_unit"] == 200
    assert len(check["worst"]) == 5 and check["worst"][0]["unit"].startswith("P")
    assert check["verdict"].split()[0] in ("good", "poor")
    assert "elasticities.csv" in out and "guide check:" in out
    # the fitted model is saved for `hbjax predict`
    prices = pd.DataFrame({"product": pd.read_csv(simulated_csv)["product"].unique()[:3]})
    prices = prices.assign(price=[2.0, 3.0, 4.0])
    prices.to_csv(tmp_path / "prices.csv", index=False)
    code, out, err = run(capsys, "predict", str(out_dir), str(tmp_path / "prices.csv"))
    assert code == 0, err
    predicted = pd.read_csv(str(tmp_path / "prices.csv") + ".predictions.csv")
    assert list(predicted.columns) == [
        "product",
        "price",
        "expected_units",
        "expected_units_lo",
        "expected_units_hi",
    ]
    assert (predicted["expected_units"] > 0).all()
    code, _, err = run(capsys, "predict", str(tmp_path), str(tmp_path / "prices.csv"))
    assert_one_line_error(code, err, "no saved fit")


def test_check_compares_a_saved_fit_with_nuts(simulated_csv, tmp_path, capsys):
    out_dir = tmp_path / "o"
    common = ["--steps", "300", "--samples", "20", "--no-progress", "--out", str(out_dir)]
    code, _, err = run(capsys, "fit", str(simulated_csv), *common)
    assert code == 0, err
    small = ["--products", "6", "--chains", "2", "--warmup", "50", "--draws", "50"]
    code, out, err = run(capsys, "check", str(out_dir), str(simulated_csv), *small)
    assert code == 0, err
    table = pd.read_csv(out_dir / "check.csv")
    assert len(table) == 6 and table["product"].str.startswith("P").all()
    assert {"sd_ratio", "covered", "nuts_median", "q05", "q95"} <= set(table.columns)
    # the elasticity scale: the fit's own table has the same means and sds
    fitted = pd.read_csv(out_dir / "elasticities.csv").set_index("product")
    np.testing.assert_allclose(table["mean"], fitted.loc[table["product"], "mean"], rtol=1e-4)
    np.testing.assert_allclose(table["sd"], fitted.loc[table["product"], "sd"], rtol=1e-4)
    assert "intervals against NUTS:" in out and "per-product k-hat:" in out
    # another table is refused in one line
    other = tmp_path / "other.csv"
    rows = pd.read_csv(simulated_csv)
    rows[rows["product"] != rows["product"].iloc[0]].to_csv(other, index=False)
    code, _, err = run(capsys, "check", str(out_dir), str(other), *small)
    assert_one_line_error(code, err, "not the table", "units")
    # ... and so is one with the same labels and other counts (x3)
    rows.assign(units_sold=3 * rows["units_sold"]).to_csv(other, index=False)
    code, _, err = run(capsys, "check", str(out_dir), str(other), *small)
    assert_one_line_error(code, err, "not the table", "rows differ")
    # a fit whose fit.json was edited (its hierarchy flipped) is refused, not used
    info = json.loads((out_dir / "fit.json").read_text())
    info["spec"]["hierarchy"] = "noncentred"
    (out_dir / "fit.json").write_text(json.dumps(info))
    for command in (["check", str(out_dir), str(simulated_csv), *small],
                    ["predict", str(out_dir), str(simulated_csv)]):  # fmt: skip
        code, _, err = run(capsys, *command)
        assert_one_line_error(code, err, "edited after the fit")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["--guide", "meanfield"],
            {"guide": "meanfield", "hierarchy": "centred", "dependent": True},
        ),
        (
            ["--hierarchy", "noncentred", "--no-dependent"],
            {"hierarchy": "noncentred", "dependent": False},
        ),
        (
            ["--guide", "lowrank", "--rank", "3"],
            {"guide": "lowrank", "rank": 3, "dependent": False},
        ),
        (["--gradient", "dreg"], {"guide": "unitblock", "gradient": "dreg"}),
        (["--learn-spreads"], {"learn_spreads": True, "hierarchy": "centred"}),
        (["--gradient", "stl", "--alpha", "1"], {"gradient": "stl", "alpha": 1.0}),
    ],
)
def test_fit_guides_and_gradients(simulated_csv, tmp_path, capsys, argv, expected):
    out_dir = tmp_path / "o"
    common = ["--steps", "20", "--samples", "20", "--diagnostic-draws", "50", "--no-progress"]
    code, _, err = run(capsys, "fit", str(simulated_csv), *argv, *common, "--out", str(out_dir))
    assert code == 0, err
    summary = json.loads((out_dir / "summary.json").read_text())
    assert {k: summary[k] for k in expected} == expected
    assert summary["guide_check"]["draws_per_unit"] == 50
    assert pd.read_csv(out_dir / "elasticities.csv")["sd"].gt(0).all()


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--guide", "lowrank", "--batch-size", "8"], ["lowrank", "minibatch"]),
        (["--guide", "lowrank", "--dependent"], ["dependent", "not lowrank"]),
        (["--gradient", "dreg", "--alpha", "0.5"], ["'dreg'", "alpha = 0"]),
        (["--gradient", "stl"], ["stl", "biased"]),
        (["--diagnostic-draws", "5"], ["--diagnostic-draws", "50"]),
        (["--guide", "fullrank"], ["--guide", "invalid choice"]),
    ],
)
def test_refused_guide_and_gradient_combinations(simulated_csv, tmp_path, capsys, argv, words):
    code, _, err = run(capsys, "fit", str(simulated_csv), *argv, "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, *words)


def test_fit_with_custom_column_names(simulated_csv, tmp_path, capsys):
    df = pd.read_csv(simulated_csv).rename(columns={"product": "sku", "units_sold": "qty"})
    df.to_csv(tmp_path / "renamed.csv", index=False)
    code, out, err = run(
        capsys,
        "fit",
        str(tmp_path / "renamed.csv"),
        "--unit",
        "sku",
        "--units",
        "qty",
        "--steps",
        "20",
        "--samples",
        "20",
        "--out",
        str(tmp_path / "o"),
        "--no-progress",
        "--no-centring",
    )
    assert code == 0, err
    assert pd.read_csv(tmp_path / "o" / "elasticities.csv").columns[0] == "sku"
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["price_centring"] is False and summary["clip_log_rate"] is None
    # 20 steps of the article's raw prices: a poor guide check, which names the centring
    guide_check = next(line for line in out.splitlines() if line.startswith("guide check:"))
    assert guide_check.startswith("guide check: poor"), guide_check
    assert "drop --no-centring" in guide_check and "unit-block guide" not in guide_check


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_every_validation_error_through_the_cli(case, tmp_path, capsys):
    make, words = BAD_INPUTS[case]
    path = tmp_path / "bad.csv"
    extra = []
    if case == "column given twice":
        frame().to_csv(path, index=False)
        extra = ["--group", "product"]
    else:
        make().to_csv(path, index=False)
    code, _, err = run(capsys, "fit", str(path), "--steps", "5", "--no-progress", *extra)
    assert_one_line_error(code, err, *[w for w in words if "index" not in w])


@pytest.mark.parametrize(
    "argv, words",
    [
        (["fit", "missing.csv"], ["no such file"]),
        (["fit", "data.xlsx"], [".csv or .parquet"]),
        (["fit", "folder.csv"], ["is a folder"]),
        (["fit", "broken.parquet"], ["cannot read", "as Parquet"]),
        (["fit", "x.csv", "--steps", "0"], ["--steps", "positive integer"]),
        (["fit", "x.csv", "--lr", "abc"], ["--lr"]),
        (["fit", "x.csv", "--lr", "nan"], ["--lr", "positive number"]),
        (["fit", "x.csv", "--seed", "1e23"], ["--seed", "from 0 to 4294967295"]),
        (["fit", "x.csv", "--seed", str(10**30)], ["--seed", "from 0 to 4294967295"]),
        (["fit", "x.csv", "--samples", "abc"], ["--samples", "positive integer"]),
        (["fit", "x.csv", "--batch-size", "0"], ["--batch-size", "positive integer"]),
        (["fit", "x.csv", "--guide", "full"], ["--guide", "invalid choice"]),
        (["prepare", "x.csv", "--out", "g", "--chunk-rows", "-5"], ["--chunk-rows"]),
        (["fit", "x.csv", "--bogus"], ["--bogus"]),
        (["simulate", "--products", "5", "--out", "x.txt"], [".csv or .parquet"]),
        (["launch"], ["invalid choice"]),
    ],
)
def test_bad_flags_and_files_are_one_line_errors(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder.csv").mkdir()
    (tmp_path / "broken.parquet").write_text("this is not a parquet file")
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, *words)


def test_default_fit_stops_by_itself_converged(simulated_csv, tmp_path, capsys):
    out_dir = tmp_path / "o"
    options = ["--diagnostic-draws", "0", "--no-progress", "--out", str(out_dir)]
    code, _, err = run(capsys, "fit", str(simulated_csv), *options, "--mcse", "0.04")
    assert code == 0 and "warning" not in err, err
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["converged"] is True and summary["steps"] < 20000
    assert summary["averaged_from_step"] < summary["averaged_to_step"] == summary["steps"]
    assert summary["mcse_of_means_in_sd"] <= 0.04 and summary["rhat"] < 1.1
    assert summary["worst_settled_mean"].startswith(".slopes['log_price']")  # named


def test_plots_without_matplotlib_are_refused_before_the_fit(
    simulated_csv, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    out_dir = tmp_path / "o"
    code, out, err = run(capsys, "fit", str(simulated_csv), "--plots", "--out", str(out_dir))
    assert_one_line_error(code, err, "--plots needs matplotlib", "hbjax[matplotlib]")
    assert out == "" and not out_dir.exists()  # nothing fitted, nothing written


def test_warnings_are_one_line_each_and_the_fit_goes_on(tmp_path, capsys):
    frame().to_csv(tmp_path / "weak.csv", index=False)
    common = ["--steps", "5", "--samples", "20", "--diagnostic-draws", "0", "--no-progress"]
    out = str(tmp_path / "out")
    code, _, err = run(capsys, "fit", str(tmp_path / "weak.csv"), *common, "--out", out)
    assert code == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("warning: ") for line in lines), err
    assert "never change price" in err and "single unit" in err
    assert "did not converge in 5 steps" in lines[2]


def test_demo_prints_the_report(capsys):
    code, out, _ = run(
        capsys,
        "demo",
        "--products",
        "60",
        "--periods",
        "10",
        "--categories",
        "3",
        "--steps",
        "30",
        "--no-progress",
    )
    assert code == 0
    for words in (
        "it/s",
        "final loss",
        "RMSE",
        "coverage",
        "global",
        "most elastic",
        "least elastic",
    ):
        assert words in out, words


def test_console_script_gives_one_line_and_exit_2_without_traceback(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "hbjax.cli", "fit", str(tmp_path / "nope.csv")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_compiled_programs_are_kept_in_the_user_cache_unless_told_not_to(tmp_path):
    """What ``hbjax fit`` turns on, and Python users with one call."""
    script = (
        "import jax; from hbjax.vi.compilation import use_persistent_cache; "
        "use_persistent_cache(); print(jax.config.jax_compilation_cache_dir)"
    )
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    cases = [
        ({"XDG_CACHE_HOME": str(tmp_path)}, str(tmp_path / "hbjax" / "xla")),
        ({"XDG_CACHE_HOME": str(tmp_path), "HBJAX_COMPILATION_CACHE": "0"}, "None"),
        ({"XDG_CACHE_HOME": str(blocked)}, "None"),  # cannot be created: no cache, no error
    ]
    for extra, expected in cases:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HBJAX_", "JAX_COMP"))}
        proc = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            env={**env, "JAX_PLATFORMS": "cpu", **extra},
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == expected, extra


def test_fit_with_a_batch_size(simulated_csv, tmp_path, capsys):
    code, _, err = run(
        capsys,
        "fit",
        str(simulated_csv),
        "--batch-size",
        "10",
        "--steps",
        "40",
        "--samples",
        "20",
        "--out",
        str(tmp_path / "o"),
        "--no-progress",
    )
    assert code == 0, err
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["batch_size"] >= 10
    assert summary["epochs"] == pytest.approx(40 * summary["batch_size"] / summary["n_units"])
    assert summary["guide"] == "unitblock"  # the default guide minibatches
    assert summary["guide_check"]["units_checked"] == summary["n_units"]  # rows at hand
    code, _, err = run(capsys, "fit", str(simulated_csv), "--batch-size", "4000")
    assert code == 2 and err.startswith("error: --batch-size 4000 is not smaller")


def test_killed_fit_resumes_to_the_uninterrupted_result(simulated_csv, tmp_path, capsys):
    # A fit is ended (SIGTERM, as a job scheduler does) after its first checkpoint: it says
    # so in one line, exits 143 and leaves no output folder; --resume finishes it, and its
    # outputs equal those of a fit never interrupted (same seed, one device). (Hard kills
    # mid-write: test_checkpoint.py.)
    import signal
    import time

    common = ["--steps", "1500", "--samples", "50", "--diagnostic-draws", "0", "--no-progress"]
    common += ["--devices", "1", "--checkpoint-every", "100"]
    folder = tmp_path / "ckpt"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    command = [sys.executable, "-m", "hbjax.cli", "fit", str(simulated_csv), *common]
    proc = subprocess.Popen(
        [*command, "--checkpoint", str(folder), "--out", str(tmp_path / "killed")],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (folder / "checkpoint.eqx").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (folder / "checkpoint.eqx").exists(), "no checkpoint within 120 s"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1].startswith("error: terminated (SIGTERM)"), stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "killed").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    from hbjax.vi.checkpoint import saved_step

    assert 100 <= saved_step(folder) < 1500
    resume = [*common, "--checkpoint", str(folder), "--resume", "--out", str(tmp_path / "r")]
    assert main(["fit", str(simulated_csv), *resume]) == 0
    assert main(["fit", str(simulated_csv), *common, "--out", str(tmp_path / "whole")]) == 0
    for name in ("elasticities.csv", "losses.csv"):
        resumed = pd.read_csv(tmp_path / "r" / name)
        whole = pd.read_csv(tmp_path / "whole" / name)
        pd.testing.assert_frame_equal(resumed, whole)
    capsys.readouterr()
    code = main(["fit", str(simulated_csv), *common, "--checkpoint", str(folder)])
    _, err = capsys.readouterr()
    assert_one_line_error(code, err, "already holds a checkpoint", "--resume")
    code = main(["fit", str(simulated_csv), "--resume"])
    _, err = capsys.readouterr()
    assert_one_line_error(code, err, "--resume needs --checkpoint")


def test_a_warning_that_is_not_hbjax_s_prints_one_line(capsys, monkeypatch):
    def overflowing_command(args):
        np.float32(3e38) * np.float32(10.0)  # NumPy: RuntimeWarning, overflow
        return 0

    monkeypatch.setattr(hbjax.cli, "run_demo", overflowing_command)
    code, _, err = run(capsys, "demo")
    assert code == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("warning: overflow") and "RuntimeWarning" in lines[0], lines[0]


def test_ctrl_c_is_one_line_and_leaves_no_output(simulated_csv, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hbjax.cli, "fit_counts", interrupted)
    out = tmp_path / "o"
    code, _, err = run(capsys, "fit", str(simulated_csv), "--no-progress", "--out", str(out))
    assert code == 130 and err.strip() == "error: interrupted", err
    assert not out.exists() and os.listdir(tmp_path) == []
