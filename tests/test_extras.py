"""hbjax imports, fits and runs its CLI without distrax or tensorflow-probability."""

import os
import subprocess
import sys
import textwrap
import types

import pytest

import hbjax
from hbjax import extras

_BLOCK = """
import sys
sys.modules["distrax"] = None  # any import of it raises ImportError
sys.modules["tensorflow_probability"] = None
"""


def _run(code: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-c", _BLOCK + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )


def test_import_fit_minibatch_checkpoint_and_demo_without_distrax(tmp_path):
    code = """
    import jax, hbjax
    from hbjax.cli import main
    assert "distrax" not in [m.split(".")[0] for m in sys.modules if sys.modules[m]]
    sim = hbjax.simulate(n_units=24, n_periods=8, n_groups=3, seed=1)
    data = hbjax.counts.elasticity_data(sim.frame)
    model, panel = data.model, data.rows
    # the low-rank guide here; the unit-block guide minibatched below, the default in the demo
    guide = hbjax.make_guide("lowrank", model, loc=model.init_latents(panel))
    result = hbjax.fit(model, guide, panel, key=jax.random.key(0), steps=5, progress=False)
    assert result.steps == 5
    guide = hbjax.make_guide("unitblock", model, loc=model.init_latents(panel))
    result = hbjax.fit(model, guide, hbjax.Minibatches(panel, batch_size=8),
                       key=jax.random.key(0), steps=6, progress=False,
                       checkpoints=hbjax.Checkpoints("ckpt", every=3))
    assert result.steps == 6
    code = main(["demo", "--products", "40", "--periods", "8", "--categories", "2",
                 "--steps", "20", "--no-progress"])
    assert code == 0
    loaded = [m for m in sys.modules if m.startswith(("distrax", "tensorflow_probability"))]
    assert all(sys.modules[m] is None for m in loaded), loaded
    print("OK")
    """
    done = _run(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("OK")
    assert "demo: 40 products" in done.stdout and "fit: 20 steps" in done.stdout


def test_a_broken_distrax_is_one_line_naming_versions(monkeypatch):
    monkeypatch.setitem(sys.modules, "distrax", None)
    with pytest.raises(ImportError) as caught:
        extras.distrax()
    message = str(caught.value)
    assert "\n" not in message
    assert "distrax" in message and "hbjax[distrax]" in message
    assert "jax " in message  # the installed JAX version is named


def test_distrax_brought_by_the_user_is_returned(monkeypatch):
    fake = types.ModuleType("distrax")
    monkeypatch.setitem(sys.modules, "distrax", fake)
    assert extras.distrax() is fake


def test_to_arviz_without_arviz_is_one_line(monkeypatch, recovery_fit):
    _, data, result = recovery_fit
    monkeypatch.setitem(sys.modules, "arviz", None)
    with pytest.raises(ImportError, match=r"to_arviz needs arviz.*hbjax\[arviz\]"):
        hbjax.counts.to_arviz(data, result.guide)


def test_installed_versions_names_only_installed_distributions():
    assert extras.installed_versions("jax").startswith("jax ")
    assert extras.installed_versions("no-such-distribution-hbjax") == "none of them installed"


def test_the_layers_fitting_core_and_rows_import_without_pandas_and_every_name_resolves(tmp_path):
    code = """
    import hbjax.vi.layers, hbjax.counts.families, hbjax.vi.model, hbjax.parallel.rows
    import hbjax.counts.regression, hbjax.counts.slopes
    heavy = [m for m in ("pandas", "optax", "tqdm", "pyarrow", "hbjax.vi.fit") if m in sys.modules]
    assert not heavy, heavy
    import hbjax.vi.fit, hbjax.vi.step, hbjax.vi.objectives  # the fitting core: no pandas, no files
    import hbjax.parallel.layouts
    application = ("pandas", "pyarrow", "hbjax.io.tables", "hbjax.counts.frame")
    loaded = [m for m in application if m in sys.modules]
    assert not loaded, loaded
    import hbjax.parallel.hosts, hbjax.counts.grid  # many hosts, the count kernel
    assert not [m for m in ("pandas", "pyarrow", "hbjax.io.tables") if m in sys.modules]
    import types
    import hbjax.counts.report, hbjax.counts.simulate  # the modules behind hbjax.fit, simulate
    import hbjax
    assert callable(hbjax.fit) and not isinstance(hbjax.fit, types.ModuleType)
    assert callable(hbjax.simulate) and not isinstance(hbjax.simulate, types.ModuleType)
    for name in hbjax.__all__:
        assert getattr(hbjax, name) is not None, name
    assert set(hbjax.__all__) <= set(dir(hbjax))
    for name in hbjax.counts.__all__:
        assert getattr(hbjax.counts, name) is not None, name
    assert hbjax.vi.checks.unit_importance and hbjax.counts.prepare
    try:
        hbjax.no_such_name
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    print("OK")
    """
    done = _run(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("OK")
