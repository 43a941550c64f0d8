"""float64 end to end where JAX's x64 is on; other float types refused in one line."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

import hbjax

pytestmark = pytest.mark.usefixtures("standard_promotion")

# x64 is process-wide and must be set before JAX starts: the check runs in its own process
_X64_FIT = """
import warnings
warnings.simplefilter("ignore")
import jax, jax.numpy as jnp, numpy as np
import hbjax
assert jax.config.jax_enable_x64
f64 = np.dtype(np.float64)
frame = hbjax.simulate(n_units=40, n_periods=12, n_groups=3, dispersion=0.3, seed=2).frame
frame["promo"] = np.random.default_rng(0).integers(0, 2, len(frame))
data = hbjax.counts.elasticity_data(frame, covariates=["promo"], likelihood="negbin")
model, rows = data.model, data.rows
assert {s.dtype for s in jax.tree.leaves(model.latent_shapes())} == {f64}
assert rows.weight.dtype == f64 and rows.columns["x"]["promo"].dtype == f64
# the grid's kernel and the rows' sum agree to float64 rounding (float32: about 1e-7)
z = model.init_latents(rows)
by_rows = float(model.log_likelihood(z, rows))
by_grid = float(model.log_likelihood(z, data.grid(hbjax.make_mesh(2))))
assert abs(by_grid - by_rows) < 1e-11 * abs(by_rows), (by_grid, by_rows)
# the pipeline's fit, cut and resumed from its checkpoint, in float64 bit for bit (all
# three checkpointed, in chunks of 50 steps: one compiled program)
fit = lambda steps, folder, resume=False: hbjax.counts.fit_counts(data, hbjax.counts.FitConfig(
    steps=steps, progress=False, checkpoint_dir=folder, checkpoint_every=50, resume=resume))
whole = fit(200, "whole")
fit(100, "ckpt")
resumed = fit(200, "ckpt", resume=True)
assert whole.losses.dtype == f64 and np.array_equal(resumed.losses, whole.losses)
floats = lambda t: {x.dtype for x in jax.tree.leaves(t) if np.issubdtype(x.dtype, np.inexact)}
assert floats(resumed.guide) == {f64}
table = data.summary(resumed.guide)["log_price/unit"]
assert np.all(np.isfinite(table[["mean", "sd"]].to_numpy()))
# saved and loaded in float64
hbjax.counts.save_fit(data, resumed, "fit")
loaded = hbjax.counts.load_fit("fit")
assert floats(loaded.guide) == {f64} and loaded.info["dependent"]
print("float64 ok")
"""


def test_a_fit_is_float64_end_to_end_where_jax_x64_is_on(tmp_path):
    """Latents, rows, both kernels, the fit and its losses, checkpoints, summaries and saved
    fits are float64 under ``JAX_ENABLE_X64=1`` (before: silently float32)."""
    env = {**os.environ, "JAX_ENABLE_X64": "1", "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_X64_FIT)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0 and "float64 ok" in done.stdout, done.stderr[-3000:]


def test_a_guide_of_another_float_type_is_refused_in_one_line(small_data, small_model):
    guide = hbjax.make_guide(
        "meanfield", small_model, loc=small_model.init_latents(small_data.rows)
    )
    half = jax.tree.map(
        lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x,
        guide,
    )
    with pytest.raises(ValueError, match="parameters are bfloat16; hbjax fits in float32, or"):
        hbjax.fit(small_model, half, small_data.rows, key=jax.random.key(0), steps=5)
