import os
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hbjax
from hbjax.counts import FitConfig
from hbjax.vi import checkpoint
from hbjax.vi.checkpoint import CheckpointError

pytestmark = pytest.mark.usefixtures("standard_promotion")


def _start(data):
    model = data.model
    return model, hbjax.make_guide("unitblock", model, loc=model.init_latents(data.rows))


def _leaves(guide):
    return [np.asarray(x) for x in jax.tree.leaves(guide)]


def _source(rows, batch_size):
    return hbjax.FullBatch(rows) if batch_size is None else hbjax.Minibatches(rows, batch_size)


@pytest.mark.parametrize("batch_size", [None, 24])
def test_resumed_fit_equals_the_uninterrupted_one(small_data, tmp_path, batch_size):
    panel = _source(small_data.rows, batch_size)
    model, guide = _start(small_data)
    options = {"key": jax.random.key(3), "progress": False}
    # chunks of 10 steps (dividing 30 and the 100-step checks), as the checkpointed fits
    # run them: one compiled program for the three (chunk lengths do not change results:
    # tests/test_fit.py)
    whole = hbjax.fit(model, guide, panel, steps=120, chunk_size=30, **options)
    folder = tmp_path / "ckpt"
    every_30 = hbjax.Checkpoints(folder, every=30)
    first = hbjax.fit(model, guide, panel, steps=60, checkpoints=every_30, **options)
    assert checkpoint.saved_step(folder) == 60 and first.steps == 60
    resume = hbjax.Checkpoints(folder, every=30, resume=True)
    resumed = hbjax.fit(model, guide, panel, steps=120, checkpoints=resume, **options)
    assert resumed.steps == 120 and checkpoint.saved_step(folder) == 120
    np.testing.assert_array_equal(resumed.losses, whole.losses)
    for a, b in zip(_leaves(resumed.guide), _leaves(whole.guide), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("batch_size", [None, 24])
def test_resume_keeps_the_average_and_stops_where_the_whole_fit_stops(
    small_data, tmp_path, batch_size
):
    # averaging starts at the first check with 40 iterates to look at (R-hat < 100 always),
    # and the fit stops once it has averaged long enough (any MCSE < 10): the run is cut
    # after averaging began and before the stop, and resumed with room to spare.
    panel = _source(small_data.rows, batch_size)
    model, guide = _start(small_data)
    quick = hbjax.vi.convergence.Convergence(rhat=100.0, mcse=10.0, check_every=20, min_average=60)
    options = {
        "key": jax.random.key(4),
        "progress": False,
        "convergence": quick,
        "chunk_size": 20,
    }
    whole = hbjax.fit(model, guide, panel, steps=400, **options)
    status = whole.convergence
    assert status.converged and 0 < status.average_from < whole.steps < 400
    cut = status.average_from + 20  # averaging has begun, the stop is still ahead
    folder = tmp_path / "ckpt"
    every_20 = hbjax.Checkpoints(folder, every=20)
    first = hbjax.fit(model, guide, panel, steps=cut, checkpoints=every_20, **options)
    assert first.convergence.average_from == status.average_from and not first.converged
    resume = hbjax.Checkpoints(folder, every=20, resume=True)
    resumed = hbjax.fit(model, guide, panel, steps=400, checkpoints=resume, **options)
    assert resumed.steps == whole.steps and resumed.convergence == status
    np.testing.assert_array_equal(resumed.losses, whole.losses)
    for a, b in zip(_leaves(resumed.guide), _leaves(whole.guide), strict=True):
        np.testing.assert_array_equal(a, b)


def test_checkpoints_that_do_not_fit_are_refused(small_data, tmp_path):
    panel = small_data.rows
    model, guide = _start(small_data)
    folder = tmp_path / "ckpt"
    resume = hbjax.Checkpoints(folder, resume=True)
    fit = lambda model, guide, panel, key, checkpoints=resume: hbjax.fit(  # noqa: E731
        model, guide, panel, key=key, steps=20, progress=False, checkpoints=checkpoints
    )
    fit(model, guide, panel, jax.random.key(0), hbjax.Checkpoints(folder))
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        fit(model, guide, panel, jax.random.key(0), hbjax.Checkpoints(folder))
    with pytest.raises(CheckpointError, match="past steps=10"):
        hbjax.fit(
            model, guide, panel, key=jax.random.key(0), steps=10, progress=False, checkpoints=resume
        )
    with pytest.raises(CheckpointError, match="another key"):
        fit(model, guide, panel, jax.random.key(1))
    frame = hbjax.simulate(n_units=50, n_periods=20, n_groups=4).frame
    other = hbjax.counts.elasticity_data(frame)
    other_model, other_guide = _start(other)
    with pytest.raises(CheckpointError, match="another fit: its state"):
        fit(other_model, other_guide, other.rows, jax.random.key(0))
    mean_field = hbjax.make_guide("meanfield", model, loc=model.init_latents(panel))
    with pytest.raises(CheckpointError, match="another fit: its guide"):
        fit(model, mean_field, panel, jax.random.key(0))
    with pytest.raises(ValueError, match="every=.... must be a positive int; got 0"):
        hbjax.Checkpoints(folder, every=0, resume=True)
    # (in the tests the type hints are checked first, naming the parameter)
    with pytest.raises(TypeError, match="Checkpoints needs a folder|parameter 'directory'"):
        hbjax.Checkpoints(None, resume=True)


def test_a_kill_while_writing_leaves_the_last_checkpoint(small_data, tmp_path):
    panel = small_data.rows
    model, guide = _start(small_data)
    folder = tmp_path / "ckpt"
    options = {"key": jax.random.key(0), "progress": False}
    hbjax.fit(model, guide, panel, steps=20, checkpoints=hbjax.Checkpoints(folder), **options)
    # a writer killed mid-way leaves only its temporary file; the checkpoint is intact
    (folder / ".checkpoint.eqx.999.tmp").write_bytes(b'{"format": "hbjax-checkpoint-1"}\n\x00')
    resume = hbjax.Checkpoints(folder, resume=True)
    resumed = hbjax.fit(model, guide, panel, steps=30, checkpoints=resume, **options)
    assert resumed.steps == 30 and len(resumed.losses) == 30
    # a truncated checkpoint (e.g. copied half-way) is refused, not half-read
    data = checkpoint.path_in(folder).read_bytes()
    checkpoint.path_in(folder).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read"):
        hbjax.fit(model, guide, panel, steps=40, checkpoints=resume, **options)


class _Stop(Exception):
    pass


def test_a_signal_during_a_write_is_handled_after_it(tmp_path, monkeypatch):
    # SIGTERM (a scheduler) and SIGINT (Ctrl-C) that arrive while the arrays are being
    # written reach their handlers once the checkpoint is complete, never half-way.
    import signal

    tree = {"a": jnp.arange(5.0), "b": jnp.ones((2, 3))}
    write = eqx.tree_serialise_leaves

    def interrupted_write(handle, leaves):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # both handled by now, were they not deferred
        write(handle, leaves)

    def stop(signum, frame):
        raise _Stop(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, stop)
    # Python's Ctrl-C handler, or SIG_IGN where the run was started in the background
    # without job control (a CI runner's `cmd &`): whichever it was, it is put back
    interrupt = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(checkpoint.eqx, "tree_serialise_leaves", interrupted_write)
    try:
        with pytest.raises(_Stop, match="SIGTERM"):
            checkpoint.save(tmp_path, tree=tree, header={"step": 3})
        assert signal.getsignal(signal.SIGTERM) is stop
        assert signal.getsignal(signal.SIGINT) is interrupt
    finally:
        signal.signal(signal.SIGTERM, previous)
    header, loaded = checkpoint.load(tmp_path, like=lambda header: tree, fingerprint={})
    assert header["step"] == 3
    np.testing.assert_array_equal(loaded["b"], np.ones((2, 3)))
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.FILENAME]


def test_a_failed_write_leaves_the_last_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    tree = {"a": jnp.arange(5.0)}
    checkpoint.save(tmp_path, tree=tree, header={"step": 1})

    def failing_write(handle, leaves):
        handle.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.eqx, "tree_serialise_leaves", failing_write)
    # one line for the CLI (a CheckpointError), the last checkpoint kept
    with pytest.raises(checkpoint.CheckpointError, match="disk full; the last one is kept"):
        checkpoint.save(tmp_path, tree={"a": jnp.zeros(5)}, header={"step": 2})
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.FILENAME]
    header, loaded = checkpoint.load(tmp_path, like=lambda header: tree, fingerprint={})
    assert header["step"] == 1
    np.testing.assert_array_equal(loaded["a"], np.arange(5.0))


def test_non_finite_step_saves_the_last_good_state(small_data, tmp_path):
    panel = small_data.rows
    model, guide = _start(small_data)
    key = jax.random.key(5)

    def flaky(model, guide, panel, *, key):
        # NaN on the steps whose own key draws below 0.02: deterministic given the key
        loss = hbjax.vi.objectives.renyi_elbo(model, guide, panel, key=key)
        return loss + jnp.where(jax.random.uniform(key) < 0.02, jnp.nan, 0.0)

    draws = [float(jax.random.uniform(jax.random.fold_in(key, i))) for i in range(400)]
    bad = next(i for i, u in enumerate(draws) if u < 0.02)
    folder = tmp_path / "ckpt"
    with pytest.raises(hbjax.NonFiniteLossError, match=f"step {bad}") as info:
        hbjax.fit(
            model,
            guide,
            panel,
            key=key,
            steps=400,
            objective=flaky,
            progress=False,
            checkpoints=hbjax.Checkpoints(folder, every=1000),
        )
    assert str(folder) in str(info.value)
    assert checkpoint.saved_step(folder) == bad
    good = info.value.result
    assert good.steps == bad and len(good.losses) == bad
    svi = hbjax.SVI(model, hbjax.vi.objectives.renyi_elbo, hbjax.default_optimizer())
    arrays, static = eqx.partition(svi.init(guide), eqx.is_array)

    def like(header):
        rows, width = header["trace"]
        return {
            "state": arrays,
            "losses": np.zeros(header["losses"], np.float32),
            "key": np.zeros_like(np.asarray(jax.random.key_data(key))),
            "trace": np.zeros((rows, width), np.float32),
            "trace_steps": np.zeros(rows, np.int64),
        }

    header, saved = checkpoint.load(folder, like=like, fingerprint={})
    assert header["step"] == bad and int(saved["state"].step) == bad
    reported = svi.guide(eqx.combine(saved["state"], static))
    for a, b in zip(_leaves(reported), _leaves(good.guide), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(saved["losses"], good.losses)


def test_a_resume_of_another_fit_is_refused_naming_what_differs(small_sim, tmp_path):
    """Data of the same shape but other content, another model option, optimiser setting
    or objective: each refused with what differs (issue: honest checkpoints)."""
    elasticity_data, fit_counts = hbjax.counts.elasticity_data, hbjax.counts.fit_counts
    data = elasticity_data(small_sim.frame)
    folder = tmp_path / "ckpt"
    base = {"steps": 20, "progress": False, "checkpoint_dir": str(folder)}
    fit_counts(data, FitConfig(**base))
    resume = {**base, "steps": 40, "resume": True}
    changed = small_sim.frame.copy()
    changed.loc[7, "units_sold"] += 1  # one count of one row
    other_data = elasticity_data(changed)
    refusals = [
        (other_data, {}, "its fit data \\(content hash\\)"),
        (data, {"learning_rate": 0.02}, "its fit learning_rate is 0.01, this fit's is 0.02"),
        (data, {"particles": 8}, "its fit particles"),
        (data, {"alpha": 0.5}, "its fit gradient"),  # alpha 0.5 takes the total gradient
        (data, {"mcse": 0.05}, "its fit mcse"),
        (elasticity_data(small_sim.frame, centre=False), {}, "its fit model"),
        (elasticity_data(small_sim.frame, intercept_prior="zero"), {}, "its fit model"),
    ]
    for other, change, words in refusals:
        with pytest.raises(CheckpointError, match=words):
            fit_counts(other, FitConfig(**resume, **change))
    missing = {**resume, "checkpoint_dir": str(tmp_path / "ckpt-typo")}
    with pytest.raises(CheckpointError, match="no checkpoint to resume"):
        fit_counts(data, FitConfig(**missing))
    # the same fit resumes; and fit() refuses another objective or caller fingerprint
    assert fit_counts(data, FitConfig(**resume)).steps == 40
    model, guide = _start(data)
    panel = data.rows
    direct = tmp_path / "direct"
    options = {"key": jax.random.key(0), "progress": False}
    adam = {"optimiser": "adam 1e-2"}
    hbjax.fit(
        model,
        guide,
        panel,
        steps=10,
        checkpoints=hbjax.Checkpoints(direct, fingerprint=adam),
        **options,
    )
    eight = hbjax.RenyiBound(alpha=0.0, num_particles=8)
    again = {
        "steps": 20,
        "checkpoints": hbjax.Checkpoints(direct, resume=True, fingerprint=adam),
        **options,
    }
    with pytest.raises(CheckpointError, match="its objective"):
        hbjax.fit(model, guide, panel, objective=eight, **again)
    article = elasticity_data(small_sim.frame, intercept_prior="zero").model
    with pytest.raises(CheckpointError, match="its model"):  # same shapes, another prior
        hbjax.fit(article, guide, panel, **again)
    other_adam = hbjax.Checkpoints(direct, resume=True, fingerprint={"optimiser": "adam 2e-2"})
    with pytest.raises(CheckpointError, match="its fit optimiser is 'adam 1e-2'"):
        hbjax.fit(model, guide, panel, **{**again, "checkpoints": other_adam})
