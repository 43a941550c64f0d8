"""Outputs written whole or not at all (issue: nothing lost)."""

import shutil

import numpy as np
import pytest

import hbjax
from hbjax.cli import main
from hbjax.io.outputs import (
    AtomicFolder,
    OutputError,
    check_file_destination,
    write_file_atomically,
)

pytestmark = pytest.mark.usefixtures("standard_promotion")


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    out = tmp_path / "out"
    with AtomicFolder(out, owns=["result.json"]) as staging:
        (staging / "result.json").write_text("1")
        (staging / "plots").mkdir()
        assert not out.exists()  # nothing in place until complete
    assert (out / "result.json").read_text() == "1" and (out / "plots").is_dir()
    # a second run replaces everything: nothing of the first is left beside it
    with AtomicFolder(out, owns=["result.json"]) as staging:
        (staging / "result.json").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["result.json"]
    # a failure at any point leaves the last complete result as it was
    with pytest.raises(RuntimeError), AtomicFolder(out, owns=["result.json"]) as staging:
        (staging / "result.json").write_text("3")
        raise RuntimeError("disk full")
    assert (out / "result.json").read_text() == "2"
    assert _leftovers(tmp_path) == []


def test_destinations_that_cannot_be_used_are_refused_before_any_work(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    (tmp_path / "a-file").write_text("")
    (tmp_path / "mine" / "result.json").write_text("an old result")  # ours, beside theirs
    for path, words in (
        ("", "empty"),
        (tmp_path / "a-file", "not a folder"),
        (tmp_path / "mine", r"holds other files \(thesis.tex\)"),
        (tmp_path / "a-file" / "out", "cannot write"),
    ):
        with pytest.raises(OutputError, match=words):
            AtomicFolder(path, owns=["result.json"], known=["result.json", "plots"])
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "years of work"
    for path, words in (("", "empty"), (tmp_path, "is a folder"), (tmp_path / "no" / "x", "not")):
        with pytest.raises(OutputError, match=words):
            check_file_destination(path)
    target = tmp_path / "table.csv"
    target.write_text("old")

    def fail(path):
        path.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match="No space left"):
        write_file_atomically(target, fail)
    assert target.read_text() == "old" and _leftovers(tmp_path) == []


def test_a_failed_fit_keeps_the_previous_results_and_a_refit_leaves_nothing_stale(
    small_sim, tmp_path, capsys
):
    table = tmp_path / "panel.csv"
    small_sim.frame.to_csv(table, index=False)
    out = tmp_path / "out"
    args = ["fit", str(table), "--out", str(out), "--steps", "100", "--no-progress"]
    args += ["--diagnostic-draws", "0"]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    (out / "plots").mkdir()  # as a run with --plots leaves them
    bad = tmp_path / "bad.csv"
    small_sim.frame.assign(
        price=small_sim.frame["price"].where(lambda x: x.index != 50, -1.0)
    ).to_csv(bad, index=False)
    capsys.readouterr()
    assert main(["fit", str(bad), *args[2:]]) == 2
    assert "price" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert main([*args, "--seed", "1"]) == 0
    assert not (out / "plots").exists()  # the new results, and only they
    assert hbjax.counts.load_fit(out).info["steps"] == 100
    assert _leftovers(tmp_path) == []
    # predict to a folder, to nothing, to a missing folder: one line each, before any work
    prices = tmp_path / "prices.csv"
    small_sim.frame.head(3)[["product", "price"]].to_csv(prices, index=False)
    capsys.readouterr()
    # a damaged saved fit: one line, not a traceback
    for name, damage in (
        ("fit.json", b"garbage"),
        ("fit.eqx", (out / "fit.eqx").read_bytes()[:99]),
    ):
        copy = tmp_path / f"damaged-{name}"
        shutil.copytree(out, copy)
        (copy / name).write_bytes(damage)
        assert main(["predict", str(copy), str(prices), "--out", str(tmp_path / "p.csv")]) == 2
        err = capsys.readouterr().err
        assert (
            err.startswith("error: ") and "damaged saved fit" in err and len(err.splitlines()) == 1
        )
    for target, words in (
        (tmp_path, "is a folder"),
        ("", "empty"),
        (tmp_path / "no" / "p.csv", "does not exist"),
    ):
        assert main(["predict", str(out), str(prices), "--out", str(target)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and words in err


def test_cli_destinations_are_checked_before_the_fit(small_sim, tmp_path, capsys):
    table = tmp_path / "panel.csv"
    small_sim.frame.to_csv(table, index=False)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("mine")
    cases = [
        (["--out", ""], "empty"),
        (["--out", str(table)], "not a folder"),
        (["--out", str(tmp_path / "notes")], "holds other files"),
        (
            ["--out", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "typo"), "--resume"],
            "no checkpoint to resume",
        ),
        (["--out", str(tmp_path / "o"), "--checkpoint", str(table)], "is a file"),
        (["--out", str(tmp_path / "o"), "--checkpoint", str(table / "sub")], "cannot create"),
    ]
    for flags, words in cases:
        capsys.readouterr()
        assert main(["fit", str(table), "--no-progress", *flags]) == 2, flags
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        assert words in err, (words, err)
    assert (tmp_path / "notes" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "o").exists() and _leftovers(tmp_path) == []
    (tmp_path / "folder.csv").mkdir()
    capsys.readouterr()
    assert main(["simulate", "--products", "5", "--out", str(tmp_path / "folder.csv")]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_a_failed_prepare_keeps_the_earlier_folder(small_sim, tmp_path, capsys):
    table, folder = tmp_path / "rows.csv", tmp_path / "rows"
    small_sim.frame.to_csv(table, index=False)
    assert main(["prepare", str(table), "--out", str(folder), "--no-progress"]) == 0
    before = np.array(hbjax.counts.elasticity_data(folder).rows.columns["counts"])
    duplicated = tmp_path / "dup.csv"
    frame = small_sim.frame
    frame.iloc[np.r_[np.arange(len(frame)), 3]].to_csv(duplicated, index=False)  # last row
    capsys.readouterr()
    code = main(
        ["prepare", str(duplicated), "--out", str(folder), "--no-progress", "--chunk-rows", "50"]
    )
    assert code == 2 and "more than once" in capsys.readouterr().err
    after = hbjax.counts.elasticity_data(folder).rows.columns["counts"]
    np.testing.assert_array_equal(after, before)
    assert _leftovers(tmp_path) == []


def test_outputs_that_would_eat_their_inputs_or_each_other_are_refused(
    small_sim, tmp_path, capsys, monkeypatch
):
    """A checkpoint inside the results folder, predictions written over the saved fit or
    the scenarios, a results folder that is this folder, one above it or a mount point:
    each refused in one line before any work, nothing replaced (issue: nothing lost)."""
    table = tmp_path / "t.csv"
    small_sim.frame.to_csv(table, index=False)
    fit = tmp_path / "fit"
    quick = ["--steps", "20", "--samples", "50", "--no-progress", "--diagnostic-draws", "0"]
    assert main(["fit", str(table), *quick, "--out", str(fit)]) == 0
    saved = (fit / "fit.json").read_text()
    capsys.readouterr()
    refusals = [
        (["fit", str(table), *quick, "--out", str(fit), "--checkpoint", str(fit / "c")], "lies in"),
        (["fit", str(table), *quick, "--out", str(fit), "--checkpoint", str(fit)], "lies in"),
        (["predict", str(fit), str(table), "--out", str(fit / "fit.json")], "would overwrite"),
        (["predict", str(fit), str(table), "--out", str(table)], "would overwrite"),
        (["fit", str(table), *quick, "--out", "."], "this folder or one above it"),
        (["fit", str(table), *quick, "--out", ".."], "this folder or one above it"),
    ]
    monkeypatch.chdir(fit.parent)
    for argv, words in refusals:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and words in err and "\n" not in err, (argv, err)
    assert (fit / "fit.json").read_text() == saved and table.stat().st_size > 0
    with pytest.raises(OutputError, match="a mount point"):
        AtomicFolder("/", owns=["fit.json"])
    assert _leftovers(tmp_path) == []


def _no_space(*args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(
    small_sim, tmp_path, capsys, monkeypatch
):
    """prepare on a disk that is full: its memory maps' space is reserved up front (without
    it a full disk is a SIGBUS). (A checkpoint's: tests/test_checkpoint.py.)"""
    import os

    table = tmp_path / "t.csv"
    small_sim.frame.to_csv(table, index=False)
    with monkeypatch.context() as patch:
        patch.setattr(os, "posix_fallocate", _no_space)
        code = main(["prepare", str(table), "--out", str(tmp_path / "rows"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "No space left" in err and "\n" not in err
    assert not (tmp_path / "rows").exists() and _leftovers(tmp_path) == []
