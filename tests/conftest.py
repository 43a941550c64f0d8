"""Shared fixtures. Four virtual CPU devices (for sharding tests) and strict dtype promotion.

XLA_FLAGS must be set before JAX initialises its backend, so it is set at import time here.
"""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
# every compiled program goes to the shared cache below, not only those that took >= 1 s
# to compile (JAX's default): the small ones recur across tests and subprocesses too
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# the CLI's cache in the user's folder stays out of the tests (tested in a subprocess) ...
os.environ["HBJAX_COMPILATION_CACHE"] = "0"
# ... but the run shares one of its own: JAX's persistent cache in a fresh folder, set up
# by the first process (pytest's, before its workers start) and inherited by the xdist
# workers and every subprocess. A program compiled by one test (a fit of the same shapes)
# is not compiled again by the next (the suite: 695 s -> 606 s on 2 cores); a cached
# executable is the one XLA would compile, so no result depends on it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="hbjax-tests-xla-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")

import hbjax  # noqa: E402


@pytest.fixture
def standard_promotion():
    """Standard dtype promotion, for tests that run optax (its Adam computes ``b1 ** count``
    with an int32 count, which strict promotion rejects). hbjax's own maths is checked under
    strict promotion by the tests that call it directly."""
    with jax.numpy_dtype_promotion("standard"):
        yield


@pytest.fixture(scope="session")
def small_sim():
    """A small simulated panel (120 products x 20 periods x 4 categories) and its truth."""
    return hbjax.simulate(n_units=120, n_periods=20, n_groups=4, seed=11)


@pytest.fixture(scope="session")
def small_data(small_sim):
    """The article's model of :func:`small_sim` and its rows (``elasticity_data``)."""
    return hbjax.counts.elasticity_data(small_sim.frame)


@pytest.fixture(scope="session")
def small_model(small_data):
    """The article's model of :func:`small_sim`."""
    return small_data.model


@pytest.fixture(scope="session")
def recovery_fit():
    """A fit of a few hundred products, shared by the recovery and posterior tests."""
    sim = hbjax.simulate(n_units=300, n_periods=52, n_groups=6, seed=5)
    data = hbjax.counts.elasticity_data(sim.frame)
    model = data.model
    guide = hbjax.MeanFieldNormal.from_shapes(
        model.latent_shapes(), loc=model.init_latents(data.rows)
    )
    with jax.numpy_dtype_promotion("standard"):
        result = hbjax.fit(
            model, guide, data.rows, key=jax.random.key(0), steps=4000, progress=False
        )
    return sim, data, result


def elasticities(model, latents):
    """``[..., unit]`` the price elasticities of the article's model at ``latents``."""
    return model.unit_slopes(latents)["log_price"]
