"""Tables larger than memory: streamed in chunks into a folder of memory-mapped rows."""

import jax
import numpy as np
import pandas as pd
import pytest

import hbjax
import hbjax.counts as hc
from hbjax.cli import main
from hbjax.counts import Effect, Slope
from hbjax.counts.frame import CountSpec
from hbjax.counts.reader import read_rows, write_rows


@pytest.fixture(scope="module")
def shuffled(small_sim, tmp_path_factory):
    """The small panel's rows in a random order with more columns, as Parquet and CSV."""
    folder = tmp_path_factory.mktemp("stream")
    frame = small_sim.frame.sample(frac=1.0, random_state=3).reset_index(drop=True)
    rng = np.random.default_rng(0)
    frame["promo"] = rng.integers(0, 2, len(frame))
    frame["exposure"] = rng.uniform(0.5, 2.0, len(frame))
    frame["region"] = np.where(frame["category"].isin(["C0", "C1"]), "north", "south")
    frame.to_parquet(folder / "rows.parquet")
    frame.to_csv(folder / "rows.csv", index=False)
    return folder, frame


#: A spec using every part of the vocabulary a table can feed.
RICH = CountSpec(
    unit="product",
    counts="units_sold",
    groups=("category", "region"),
    slopes=(Slope("price", log=True, over=("unit", "category", "region")), Slope("promo")),
    effects=(Effect(("region", "period")), Effect(("category",))),
    offset="exposure",
    period="period",
)


def _same(a, b):
    """Two CountData hold the same model, rows (bit for bit) and labels."""
    left = jax.tree.leaves((a.model, a.rows.unit, a.rows.weight, a.rows.columns, a.period))
    right = jax.tree.leaves((b.model, b.rows.unit, b.rows.weight, b.rows.columns, b.period))
    assert len(left) == len(right)
    for x, y in zip(left, right, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert a.units.equals(b.units) and a.periods.equals(b.periods)
    assert all(a.levels[g].equals(b.levels[g]) for g in a.levels)
    assert all(a.cells[e].equals(b.cells[e]) for e in a.cells)


@pytest.mark.parametrize("suffix", ["parquet", "csv"])
@pytest.mark.parametrize("spec", ["article", "rich"])
def test_streamed_rows_are_the_in_memory_rows_bit_for_bit(shuffled, tmp_path, suffix, spec):
    folder, frame = shuffled
    path = folder / f"rows.{suffix}"
    if spec == "article":
        # 333 rows a chunk: every unit's rows spread over several chunks
        streamed = hc.prepare(path, tmp_path / "rows", chunk_rows=333, progress=False)
        expected = hc.elasticity_data(path)
        reopened = hc.elasticity_data(tmp_path / "rows", likelihood="negbin", centre=False)
        assert reopened.model.likelihood.name == "negbin" and not reopened.model.centre_covariates
        _same(hc.elasticity_data(path, likelihood="negbin", centre=False), reopened)
    else:
        streamed = write_rows(path, tmp_path / "rows", RICH, chunk_rows=333, progress=False)
        fields = {k: v for k, v in RICH.__dict__.items() if k != "zero_inflation"}
        expected = hc.from_file(path, **fields)
    _same(expected, streamed)
    assert streamed.on_disk and isinstance(streamed.rows.columns["counts"], np.memmap)
    assert not expected.on_disk
    assert len(streamed.rows.unit) == len(frame)


def _write(frame, path):
    frame.to_parquet(path)
    return path


def test_duplicate_rows_in_different_chunks_are_refused(shuffled, tmp_path):
    _, frame = shuffled
    doubled = pd.concat([frame, frame.iloc[[5]]], ignore_index=True)
    path = _write(doubled, tmp_path / "dup.parquet")
    row = frame.iloc[5]
    with pytest.raises(hbjax.DataValidationError, match="more than once") as info:
        hc.prepare(path, tmp_path / "rows", chunk_rows=500, progress=False)
    assert repr(row["product"]) in str(info.value) and "different chunks" in str(info.value)
    assert not (tmp_path / "rows").exists()
    # within one chunk, the rows are named
    with pytest.raises(hbjax.DataValidationError, match=f"first at index 5, {len(frame)}"):
        hc.prepare(path, tmp_path / "rows", chunk_rows=10**6, progress=False)


def test_bad_value_in_a_later_chunk_names_its_row_in_the_file(shuffled, tmp_path):
    _, frame = shuffled
    bad = frame.copy()
    bad.loc[1234, "price"] = -1.0
    path = _write(bad, tmp_path / "bad.parquet")
    with pytest.raises(hbjax.DataValidationError, match=r"'price'.*first at index 1234"):
        hc.prepare(path, tmp_path / "rows", chunk_rows=500, progress=False)
    assert not (tmp_path / "rows").exists()  # checked before anything is written


def test_unit_in_two_groups_across_chunks_is_refused(shuffled, tmp_path):
    _, frame = shuffled
    moved = frame.copy()
    last = moved.index[-1]
    moved.loc[last, "category"] = "somewhere-else"
    path = _write(moved, tmp_path / "groups.parquet")
    with pytest.raises(hbjax.DataValidationError, match="more than one group") as info:
        hc.prepare(path, tmp_path / "rows", chunk_rows=500, progress=False)
    assert repr(moved.loc[last, "product"]) in str(info.value)


def test_not_a_rows_folder_and_bad_chunk_size(tmp_path):
    with pytest.raises(hbjax.DataValidationError, match="not a prepared folder"):
        read_rows(tmp_path)
    with pytest.raises(ValueError, match="chunk_rows"):
        hc.prepare(tmp_path / "x.parquet", tmp_path / "rows", chunk_rows=0)


@pytest.mark.usefixtures("standard_promotion")
def test_cli_prepare_then_fit_is_fitting_the_file(shuffled, tmp_path, capsys):
    folder, _ = shuffled
    table, rows = folder / "rows.parquet", tmp_path / "rows"
    assert main(["prepare", str(table), "--out", str(rows), "--no-progress"]) == 0
    assert "fit it with" in capsys.readouterr().out
    common = ["--batch-size", "24", "--steps", "150", "--samples", "200", "--no-progress"]
    assert main(["fit", str(rows), *common, "--out", str(tmp_path / "a")]) == 0
    assert main(["fit", str(table), *common, "--out", str(tmp_path / "b")]) == 0
    # the same rows, batches and start: the same fit, bit for bit
    for name in ("elasticities.csv", "estimates.csv"):
        a, b = (pd.read_csv(tmp_path / x / name) for x in "ab")
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    summary = (tmp_path / "a" / "summary.json").read_text()
    assert "on disk" in summary  # the row-by-row checks are skipped, and say why
    capsys.readouterr()
    assert main(["fit", str(rows), "--steps", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--batch-size" in err and len(err.splitlines()) == 1
    # a column flag naming another column than the folder's is refused, not ignored
    other = ["--group", "region", "--out", str(tmp_path / "c")]
    assert main(["fit", str(rows), *common, *other]) == 2
    err = capsys.readouterr().err.strip()
    assert "groups ('region',)" in err and "prepared with groups ('category',)" in err
    with pytest.raises(hbjax.DataValidationError, match="prepared with counts 'units_sold'"):
        hbjax.counts.elasticity_data(rows, counts="qty")  # the API refuses it too


def test_each_process_gathers_only_its_own_blocks_of_a_prepared_folder(
    shuffled, tmp_path, monkeypatch
):
    """Many hosts: a process holds the blocks of its own devices, and every layout gathers
    from the folder's memory maps the rows of those blocks' units only (full-batch rows, the
    grid and minibatches). Here "process 0 of 2" on a 2-device mesh: block 0 of 2."""
    import hbjax.counts.grid as grid_module
    import hbjax.parallel.rows as rows_module

    folder, _ = shuffled
    write_rows(folder / "rows.parquet", tmp_path / "rows", RICH)
    data = read_rows(tmp_path / "rows")
    rows, mesh = data.rows, hbjax.make_mesh(2)
    unit_rows = rows.unit_rows
    assert isinstance(rows.columns["counts"], np.memmap)  # on disk
    sent = []
    for module in (rows_module, grid_module):
        monkeypatch.setattr(module, "local_blocks", lambda mesh, n_blocks: [0])
        monkeypatch.setattr(
            module, "place_stacked", lambda mesh, host, total, stacked: sent.append(host) or {}
        )
    plan = rows_module.plan_blocks(unit_rows, 2)
    mine = np.arange(plan[0], plan[1])  # block 0's units
    with pytest.raises(TypeError):  # the placed result is a stub; the host arrays are caught
        rows_module.shard_rows(rows, mesh, n_blocks=2)
    real = sent[-1]["weight"] > 0
    assert set(sent[-1]["unit"][real]) == set(mine) and real.sum() == unit_rows[mine].sum()
    with pytest.raises((TypeError, KeyError)):
        data.grid(mesh, n_blocks=2)
    host = sent[-1]
    assert set(host["slot_unit"][host["observed"].any(axis=1)]) <= set(mine)
    assert host["observed"].sum() == unit_rows[mine].sum()
    sampler = rows_module.RowSampler(rows, 8, mesh=mesh, n_blocks=2)
    for step in range(3):
        batch = sampler.host_batch(step)
        assert set(np.asarray(batch["unit"]).ravel()) <= set(mine)
