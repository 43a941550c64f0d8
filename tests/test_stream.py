import jax
import numpy as np
import pandas as pd
import pytest
from tolerances import assert_f32_close, f32_rtol

import hbjax
from hbjax.cli import main
from hbjax.minibatch import UnitSampler


@pytest.fixture(scope="module")
def shuffled(small_sim, tmp_path_factory):
    """The small panel's rows in a random order, as Parquet and CSV files."""
    folder = tmp_path_factory.mktemp("stream")
    frame = small_sim.frame.sample(frac=1.0, random_state=3).reset_index(drop=True)
    frame.to_parquet(folder / "rows.parquet")
    frame.to_csv(folder / "rows.csv", index=False)
    return folder, frame


@pytest.mark.parametrize("suffix", ["parquet", "csv"])
def test_streamed_grid_matches_the_in_memory_panel(shuffled, small_panel, tmp_path, suffix):
    folder, _ = shuffled
    store = hbjax.write_grid(
        folder / f"rows.{suffix}", tmp_path / "grid", chunk_rows=333, progress=False
    )
    panel, encoding = small_panel
    for name in ("units", "groups", "periods"):
        assert getattr(store.encoding, name).equals(getattr(encoding, name)), name
    np.testing.assert_array_equal(store.encoding.unit_group, encoding.unit_group)
    assert store.n_obs == panel.n_rows
    # per-unit sums over its rows, chunk by chunk vs at once (float32: n_periods terms)
    moments = np.asarray(panel.unit_moments())
    assert_f32_close(store.stats.moments, moments, terms=2 * panel.n_periods)
    in_memory, streamed = UnitSampler(panel, 24), store.sampler(24)
    np.testing.assert_array_equal(in_memory.units, streamed.units)
    for step in (0, 7):
        expected, got = in_memory.host_batch(step), streamed.host_batch(step)
        for name, value in expected.items():
            if name == "log_factorial":  # summed chunk by chunk: rounding only
                np.testing.assert_allclose(got[name], value, rtol=f32_rtol(terms=4))
            else:
                np.testing.assert_array_equal(got[name], value, err_msg=name)
    assert isinstance(streamed.grid["counts"], np.memmap)


def _write(frame, path):
    frame.to_parquet(path)
    return path


def test_duplicate_rows_in_different_chunks_are_refused(shuffled, tmp_path):
    _, frame = shuffled
    doubled = pd.concat([frame, frame.iloc[[5]]], ignore_index=True)
    path = _write(doubled, tmp_path / "dup.parquet")
    row = frame.iloc[5]
    with pytest.raises(hbjax.DataValidationError, match="more than once") as info:
        hbjax.write_grid(path, tmp_path / "grid", chunk_rows=500, progress=False)
    assert repr(row["product"]) in str(info.value)


def test_bad_value_in_a_later_chunk_names_its_row_in_the_file(shuffled, tmp_path):
    _, frame = shuffled
    bad = frame.copy()
    bad.loc[1234, "price"] = -1.0
    path = _write(bad, tmp_path / "bad.parquet")
    with pytest.raises(hbjax.DataValidationError, match=r"'price'.*first at index 1234"):
        hbjax.write_grid(path, tmp_path / "grid", chunk_rows=500, progress=False)
    assert not (tmp_path / "grid").exists()  # checked before anything is written


def test_unit_in_two_groups_across_chunks_is_refused(shuffled, tmp_path):
    _, frame = shuffled
    moved = frame.copy()
    last = moved.index[-1]
    moved.loc[last, "category"] = "somewhere-else"
    path = _write(moved, tmp_path / "groups.parquet")
    with pytest.raises(hbjax.DataValidationError, match="more than one group"):
        hbjax.write_grid(path, tmp_path / "grid", chunk_rows=500, progress=False)


def test_not_a_grid_folder_and_bad_chunk_size(tmp_path):
    with pytest.raises(hbjax.DataValidationError, match="not a grid folder"):
        hbjax.read_grid(tmp_path)
    with pytest.raises(ValueError, match="chunk_rows"):
        hbjax.write_grid(tmp_path / "x.parquet", tmp_path / "grid", chunk_rows=0)


@pytest.mark.usefixtures("standard_promotion")
def test_cli_prepare_then_fit_grid_matches_fitting_the_file(shuffled, tmp_path, capsys):
    folder, _ = shuffled
    table, grid = folder / "rows.parquet", tmp_path / "grid"
    assert main(["prepare", str(table), "--out", str(grid), "--no-progress"]) == 0
    common = ["--batch-size", "24", "--steps", "150", "--samples", "200", "--no-progress"]
    assert main(["fit", str(grid), *common, "--out", str(tmp_path / "a")]) == 0
    a = pd.read_csv(tmp_path / "a" / "elasticities.csv")
    # the same minibatch fit of the table in memory (a grid folder is fitted by the
    # article's own stack until the streamed grid moves to the one path)
    panel, encoding = hbjax.from_file(table)
    config = hbjax.FitConfig(batch_size=24, steps=150, progress=False)
    result = hbjax.fit_elasticities(panel, config, mesh=hbjax.make_mesh())
    b = hbjax.summarize(result, encoding, num_samples=200, key=jax.random.key(0)).units
    assert a["product"].astype(str).equals(b["product"].astype(str))
    # Same batches and start; the per-unit sums differ only by float rounding.
    assert np.max(np.abs(a["mean"] - b["mean"])) < 0.1 * np.median(b["sd"])
    capsys.readouterr()
    assert main(["fit", str(grid), "--steps", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--batch-size" in err and len(err.splitlines()) == 1
