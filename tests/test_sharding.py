import functools
import os
import socket
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import pandas as pd
import pytest
from tolerances import assert_f32_close, f32_rtol

import hbjax
from hbjax.cli import main
from hbjax.parallel import blocks, hosts
from hbjax.parallel.layouts import Auto, Dense, Rows, as_layout


def odd_data():
    """The article's model of a panel whose row count is divisible by none of 2, 3, 4."""
    sim = hbjax.simulate(n_units=37, n_periods=9, n_groups=3, seed=8)
    data = hbjax.counts.elasticity_data(sim.frame)
    assert all(len(data.rows.unit) % n for n in (2, 3, 4)), len(data.rows.unit)
    return data


def test_layouts_are_modules_checked_when_built():
    data = odd_data()
    n_rows = len(data.rows.unit)
    assert as_layout("dense", cell_chunk=2) == Dense(cell_chunk=2)
    assert as_layout("rows") == Rows() and as_layout(Auto()) == Auto()
    sparse = n_rows / (len(data.units) * len(data.periods))
    assert data.grid_fill == pytest.approx(sparse)
    assert Auto(min_fill=sparse).choose(sparse) == Dense()
    assert Auto(min_fill=min(1.0, sparse + 0.01)).choose(sparse) == Rows()
    for build, words in (
        (lambda: Dense(cell_chunk=0), "cell_chunk must be a positive int"),  # when built
        (lambda: Auto(min_fill=1.5), "min_fill must be from 0 to 1"),
        (lambda: as_layout(Dense(), cell_chunk=2), "into the layout"),
        (lambda: as_layout("grid"), "layout must be one of auto"),
        (lambda: as_layout("rows", cell_chunk=2), "dense layout"),
    ):
        with pytest.raises(blocks.ShardingError, match=words):
            build()


def test_blocks_hold_whole_units_and_are_balanced():
    rng = np.random.default_rng(0)
    unit_rows = rng.integers(1, 30, 50)
    for n in (1, 2, 3, 4, 7):
        units = blocks.plan_blocks(unit_rows, n)
        assert units[0] == 0 and units[-1] == 50 and np.all(np.diff(units) >= 0)
        rows = np.add.reduceat(np.r_[unit_rows, 0], units[:-1]) * (np.diff(units) > 0)
        assert rows.sum() == unit_rows.sum()
        # each block within one unit's rows (< 30) of an equal split
        assert np.all(np.abs(rows - unit_rows.sum() / n) < 30), (n, rows)


def test_block_count_does_not_depend_on_the_device_count():
    counts = {n: blocks.default_block_count(5000, 520, n) for n in (1, 2, 3, 4, 6, 8, 12)}
    assert set(counts.values()) == {24}
    assert blocks.default_block_count(5000, 520, 5) == 120
    assert blocks.default_block_count(60, 36, 1) == 12  # at least 4 units per block
    assert blocks.default_block_count(60, 36, 7) == 7  # falls back to one per device


@functools.cache
def _renyi(particle_map):
    """The objective's value and gradient with the guide's particles mapped as told."""
    return eqx.filter_jit(
        eqx.filter_value_and_grad(
            lambda guide, model, panel, key: hbjax.vi.objectives.renyi_elbo(
                model, guide, panel, key=key, num_particles=4, particle_map=particle_map
            )
        )
    )


@pytest.fixture(scope="module")
def unsharded():
    """``odd_data()``, a guide, a key and the plain row kernel's loss and gradient on one
    device: the reference of every kernel below, computed (and compiled) once."""
    data = odd_data()  # price-centred: the kernels get centres
    model, rows = data.model, data.rows
    guide = hbjax.MeanFieldNormal.from_shapes(model.latent_shapes(), loc=model.init_latents(rows))
    key = jax.random.key(2)
    loss, grad = _renyi("sequential")(guide, model, jax.device_put(rows), key)
    return data, guide, key, loss, grad


@pytest.mark.parametrize(
    ("layout", "cell_chunk", "particle_map"),
    [
        ("rows", None, "sequential"),
        ("dense", 1, "sequential"),  # the CPU shape
        ("dense", 4, "vectorized"),  # the GPU shape: chunked cell sums, vmap over particles
        ("rows", None, "vectorized"),
    ],
)
@pytest.mark.parametrize("n_devices", [1, 2, 3, 4])
def test_loss_and_gradients_match_unsharded(n_devices, layout, cell_chunk, particle_map, unsharded):
    """Every kernel (CPU- and GPU-shaped) against the plain row kernel on one device."""
    data, guide, key, base_loss, base_grad = unsharded
    n_rows = len(data.rows.unit)
    mesh = hbjax.make_mesh(n_devices)
    if layout == "dense":
        sharded = data.grid(mesh, cell_chunk=cell_chunk)
        assert set(sharded.cell_chunk.values()) <= {cell_chunk, 1}
    else:
        sharded = hbjax.shard_rows(data.rows, mesh)
    loss, grad = _renyi(particle_map)(guide, data.model, sharded, key)
    # float32: partial sums in another order differ by at most n_rows * eps * the sum of
    # sizes (log-probabilities, all <= 0: the sum's own size); a gradient entry's terms are
    # at most its largest entry in size
    np.testing.assert_allclose(float(loss), float(base_loss), rtol=f32_rtol(terms=n_rows))
    for g, b in zip(jax.tree.leaves(grad), jax.tree.leaves(base_grad), strict=True):
        assert_f32_close(g, b, terms=n_rows, magnitude=np.abs(b).max())


@pytest.mark.parametrize("seed", range(4))
def test_slot_plan_puts_every_unit_once_in_its_block_in_one_group_chunks(seed):
    rng = np.random.default_rng(seed)
    for _ in range(25):
        n_units, n_groups, n_blocks = (int(rng.integers(1, k)) for k in (60, 6, 7))
        unit_group = rng.integers(0, n_groups, n_units)
        units = blocks.plan_blocks(rng.integers(1, 10, n_units), n_blocks)
        block_of = np.repeat(np.arange(n_blocks), np.diff(units))
        for chunk in (1, 2, 4, 8):
            slots, slot_of_unit, slot_unit = blocks.slot_plan(unit_group, units, chunk)
            assert slots % chunk == 0 and slot_unit.shape == (n_blocks, slots)
            assert slots == blocks._block_slots(unit_group, units, chunk)
            assert np.all(slot_unit[block_of, slot_of_unit] == np.arange(n_units))
            assert len(set(zip(block_of, slot_of_unit, strict=True))) == n_units
            for b in np.flatnonzero(np.diff(units)):  # padding uses the block's own units
                assert np.all((slot_unit[b] >= units[b]) & (slot_unit[b] < units[b + 1]))
            groups = unit_group[slot_unit]
            assert np.all(np.diff(groups, axis=1) >= 0)  # sorted: contiguous segments
            chunks = groups.reshape(n_blocks, -1, chunk)
            assert np.all(chunks == chunks[:, :, :1])  # no chunk mixes groups


def test_cell_chunk_default_is_per_backend_and_bounds_the_padding():
    rng = np.random.default_rng(1)
    unit_group = np.r_[np.arange(10), np.sort(rng.integers(0, 10, 99_990))]
    units = blocks.plan_blocks(np.full(len(unit_group), 156), 24)
    assert blocks.default_cell_chunk(unit_group, units, "cpu") == 1
    chunk = blocks.default_cell_chunk(unit_group, units, "gpu")
    assert chunk == 32  # 64 would pad the first block (all 10 groups) past 10%
    assert blocks._block_slots(unit_group, units, chunk) <= 1.1 * blocks._block_slots(
        unit_group, units, 1
    )
    assert blocks._block_slots(unit_group, units, 2 * chunk) > 1.1 * blocks._block_slots(
        unit_group, units, 1
    )


def test_dense_placement_splits_whole_units_and_keeps_every_observation():
    data = odd_data()
    grid = data.grid(hbjax.make_mesh(4))
    assert grid.n_blocks % 4 == 0
    assert int(np.asarray(grid.observed).sum()) == len(data.rows.unit)
    for name in ("observed", "slot_unit"):
        shards = getattr(grid, name).addressable_shards
        assert len({s.device for s in shards}) == 4
        assert all(s.data.shape[0] < grid.observed.shape[0] for s in shards)
    units_per_device = []
    for obs, unit in zip(
        grid.observed.addressable_shards, grid.slot_unit.addressable_shards, strict=True
    ):
        seen = np.asarray(obs.data).any(axis=1)
        units_per_device.append(set(np.asarray(unit.data)[seen].tolist()))
    for a in range(4):
        for b in range(a + 1, 4):
            assert not units_per_device[a] & units_per_device[b]
    counts = np.asarray(data.rows.columns["counts"], np.float64)
    np.testing.assert_allclose(
        np.asarray(grid.counts_by_unit), np.bincount(np.asarray(data.rows.unit), counts)
    )


def test_fit_gives_the_same_elasticities_on_1_and_4_devices():
    data = odd_data()
    model, rows = data.model, data.rows
    guide = hbjax.MeanFieldNormal.from_shapes(model.latent_shapes(), loc=model.init_latents(rows))
    means = {}
    with jax.numpy_dtype_promotion("standard"):
        for n in (1, 4):
            result = hbjax.fit(
                model,
                guide,
                hbjax.FullBatch(rows, hbjax.make_mesh(n)),
                key=jax.random.key(0),
                steps=300,
                chunk_size=70,
                progress=False,
            )
            assert result.num_traces == 1
            units = data.summary(result.guide)["log_price/unit"]
            means[n], sds = units["mean"].to_numpy(), units["sd"].to_numpy()
    # Per step the two differ by float rounding only (~1e-7). Adam's per-coordinate
    # normalisation amplifies such differences chaotically (x10 per ~150 steps here; over
    # thousands of steps they reach the SGD noise floor), as with any change of
    # floating-point order. After 300 steps they must stay invisible next to the posterior
    # uncertainty: under 1% of each elasticity's posterior sd.
    assert np.all(np.abs(means[4] - means[1]) < 0.01 * sds)


def test_bad_device_counts_are_clear_errors(tmp_path, capsys):
    with pytest.raises(blocks.ShardingError, match="asked for 9 devices but 4"):
        hbjax.make_mesh(9)
    path = tmp_path / "p.csv"
    hbjax.simulate(n_units=10, n_periods=4, n_groups=2).frame.to_csv(path, index=False)
    assert main(["fit", str(path), "--devices", "9", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --devices: asked for 9 devices") and "\n" not in err


def test_process_id_out_of_range_is_refused_before_connecting():
    config = hosts.DistributedConfig("127.0.0.1:1234", num_processes=2, process_id=2)
    with pytest.raises(blocks.ShardingError, match=r"process-id must be in \[0, 1\]"):
        hosts.initialize_distributed(config)
    with pytest.raises(blocks.ShardingError, match="HOST:PORT"):
        hosts.initialize_distributed(hosts.DistributedConfig("localhost", 2, 0))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*argv, devices=1):
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
    )
    return subprocess.Popen(
        [sys.executable, "-m", "hbjax.cli", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def panel_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("hosts") / "panel.parquet"
    hbjax.simulate(n_units=60, n_periods=12, n_groups=3, seed=4).frame.to_parquet(path)
    return path


def _vocabulary_table(folder):
    from test_counts import _three_levels

    frame, _ = _three_levels(np.random.default_rng(5), n_units=24, n_weeks=10)
    frame.to_csv(folder / "sales.csv", index=False)
    flags = ["--unit", "sku", "--group", "sub,cat", "--period", "week", "--price", "price"]
    flags += ["--units", "qty", "--covariates", "promo", "--likelihood", "negbin"]
    return folder / "sales.csv", flags


def test_hbjax_fit_on_two_processes_runs_the_program_of_one_process_on_two_devices(tmp_path):
    """`hbjax fit` on 2 hosts x 1 device gives the estimates of 1 host x 2 devices bit for
    bit: the vocabulary's flags (two levels, a covariate, a negative binomial) with
    minibatched rows drawn per block; only process 0 writes. (The grid and convergence
    across processes: the next test.)"""
    table, flags = _vocabulary_table(tmp_path)
    common = ["fit", str(table), *flags, "--steps", "40", "--batch-size", "12"]
    common += ["--samples", "50", "--no-progress"]
    address = f"127.0.0.1:{free_port()}"
    hosts = ["--coordinator", address, "--num-processes", "2", "--process-id"]
    procs = [cli(*common, "--out", str(tmp_path / f"p{i}"), *hosts, str(i)) for i in range(2)]
    two_devices = cli(*common, "--out", str(tmp_path / "two_devices"), devices=2)
    for proc in (*procs, two_devices):
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
    assert not (tmp_path / "p1").exists()  # only process 0 writes
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "p0" / "estimates.csv"),
        pd.read_csv(tmp_path / "two_devices" / "estimates.csv"),
    )
    summary = pd.read_json(tmp_path / "p0" / "summary.json", typ="series")
    assert summary["devices"] == 2 and summary["processes"] == 2
    assert summary["batch_size"] == 12 and summary["n_obs"] == len(pd.read_csv(table))
    assert summary["guide_check"]["units_checked"] == summary["n_units"]  # rows at hand


@pytest.mark.parametrize("batch", [[], ["--batch-size", "12"]], ids=["grid", "minibatch"])
def test_two_processes_average_and_stop_as_one_process_on_two_devices(tmp_path, batch):
    """A fit that begins averaging and stops by itself (a loose rule: a few hundred steps)
    on 2 hosts x 1 device: the guide, steps and averaging of 1 host x 2 devices, bit for
    bit. Placing the averaging's first step under the loop's transfer guard crashed both
    processes once averaging began (issue "Nothing lost on any route")."""
    script = str(Path(__file__).parent / "helpers" / "distributed_fit.py")

    def run(out, *flags, devices=1):
        env = dict(
            os.environ,
            XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
            JAX_PLATFORMS="cpu",
        )
        command = [sys.executable, script, str(tmp_path / out), *batch, *flags]
        return subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)

    address = f"127.0.0.1:{free_port()}"
    procs = [run("hosts.npz", "--coordinator", address, "--process-id", str(i)) for i in (0, 1)]
    procs.append(run("devices.npz", devices=2))
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
    hosts, devices = np.load(tmp_path / "hosts.npz"), np.load(tmp_path / "devices.npz")
    assert int(hosts["average_from"]) > 0 and bool(hosts["converged"])
    assert int(hosts["steps"]) < 2000  # stopped by the rule, not the step budget
    assert sorted(hosts.files) == sorted(devices.files)
    for name in hosts.files:
        np.testing.assert_array_equal(hosts[name], devices[name], err_msg=name)


def test_unreachable_coordinator_is_a_bounded_one_line_error(panel_file):
    proc = cli(
        "fit",
        str(panel_file),
        "--coordinator",
        f"127.0.0.1:{free_port()}",
        "--num-processes",
        "2",
        "--process-id",
        "1",
        "--timeout",
        "2",
    )
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err.strip().startswith("error: no coordinator answered") and "Traceback" not in err


@pytest.mark.parametrize(
    "flags, words",
    [
        (
            ["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "5"],
            ["process-id must be in [0, 1]"],
        ),
        (["--coordinator", "127.0.0.1:1", "--num-processes", "2"], ["--process-id"]),
        (["--coordinator", "nowhere", "--num-processes", "2", "--process-id", "1"], ["HOST:PORT"]),
    ],
)
def test_bad_multi_host_flags_are_one_line_errors(flags, words, panel_file, capsys):
    assert main(["fit", str(panel_file), "--no-progress", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    for word in words:
        assert word in err
