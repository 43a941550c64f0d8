import equinox as eqx
import jax
import numpy as np
import pytest
from test_objectives import MODEL, Y, exact_posterior_guide

from hbjax.vi.diagnostics import (
    ImportanceDiagnostics,
    importance_diagnostics,
    importance_sample_size,
    psis,
)
from hbjax.vi.guide import inverse_softplus


@pytest.mark.parametrize("variance", [1.25, 4.0])
def test_k_hat_recovers_the_known_tail_shape(variance):
    # Proposal N(0, 1), target N(0, v): w ~ exp(x^2 (1 - 1/v) / 2) has Pareto tail shape
    # k = 1 - 1/v. With S = 100k draws the tail has M = 949 draws; se(k) ~ (1 + k)/sqrt(M)
    # ~ 0.06: the tolerance is 2.5 se.
    x = np.random.default_rng(0).standard_normal(100_000)
    log_w = 0.5 * x**2 * (1 - 1 / variance)
    smoothed, k = psis(log_w)
    assert abs(k - (1 - 1 / variance)) < 0.15, k
    np.testing.assert_allclose(np.logaddexp.reduce(smoothed), 0.0, atol=1e-9)
    assert smoothed.max() <= 0.0


def test_equal_weights_are_perfect_and_validated():
    smoothed, k = psis(np.zeros(100))
    assert k == -np.inf and np.allclose(smoothed, -np.log(100))
    # equal up to float32 rounding (an exact guide's weights): still ties, not a tail
    ulps = np.random.default_rng(0).integers(0, 4, 100) * np.finfo(np.float32).eps * 8.5
    assert psis(-8.5 + ulps)[1] == -np.inf
    assert np.isfinite(psis(-8.5 + 1e-3 * np.random.default_rng(0).standard_normal(100))[1])
    assert importance_sample_size(np.zeros(100)) == pytest.approx(100)
    assert importance_sample_size(np.r_[0.0, np.full(99, -50.0)]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="finite"):
        psis(np.array([0.0, np.nan, 1.0]))


@pytest.mark.usefixtures("standard_promotion")
def test_diagnostics_tell_an_exact_guide_from_a_narrow_one():
    # Over 10 keys. The exact guide's weights are equal up to float32 rounding: ties, not a
    # heavy tail (k = -inf), every key. A guide 5x too narrow: w ~ exp(x^2 (1 - 1/25) / 2),
    # k = 0.96 in the limit; with 2,000 draws k-hat is biased low and noisy (over 30 keys:
    # mean 0.84, sd 0.15, min 0.51), so each key must be far from the exact guide and the
    # mean over keys above 0.7 (3 standard errors below its expected 0.84).
    exact = exact_posterior_guide()
    narrow = eqx.tree_at(
        lambda g: g.raw_scale["mu"], exact, inverse_softplus(exact.scale["mu"] / 5)
    )
    k_narrow = []
    for seed in range(10):
        key = jax.random.key(seed)
        good = importance_diagnostics(MODEL, exact, Y, key=key, num_draws=400)
        assert good.k_hat < 0.5 and good.ess > 0.99 * 400, (seed, good)
        assert good.verdict.startswith("good")
        bad = importance_diagnostics(MODEL, narrow, Y, key=key, num_draws=2000)
        assert bad.k_hat > 0.4 and bad.ess < 0.3 * 2000, (seed, bad)
        k_narrow.append(bad.k_hat)
    assert np.mean(k_narrow) > 0.7, k_narrow
    assert ImportanceDiagnostics(0.9, 10.0, 100).verdict.startswith("poor")
    assert set(bad.to_dict()) == {"k_hat", "ess", "num_draws", "verdict"}
    with pytest.raises(ValueError, match="num_draws"):
        importance_diagnostics(MODEL, exact, Y, key=jax.random.key(0), num_draws=5)
    assert ImportanceDiagnostics(0.6, 10.0, 100).verdict.startswith("ok")


@pytest.mark.parametrize("seed", range(3))
def test_psis_agrees_with_arviz(seed):
    """k-hat and the smoothed log weights against ArviZ's independent implementation
    (``arviz.psislw``, r_eff = 1) on light, moderate and heavy tails."""
    import arviz as az  # the test extra has it

    rng = np.random.default_rng(seed)
    cases = {
        "light": np.log(np.abs(rng.standard_t(3, 2000))),
        "moderate": 0.3 * rng.standard_normal(1000) ** 2,
        "heavy": np.log1p(rng.pareto(1.2, 500)),
        "lognormal": 1.5 * rng.standard_normal(4000),
    }
    for name, log_w in cases.items():
        expected, expected_k = az.psislw(log_w.copy(), reff=1.0)
        smoothed, k = psis(log_w)
        assert k == pytest.approx(float(expected_k), abs=1e-9), name
        np.testing.assert_allclose(smoothed, np.asarray(expected), atol=1e-9, err_msg=name)
