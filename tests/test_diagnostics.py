import equinox as eqx
import jax
import numpy as np
import pytest
from test_objectives import MODEL, Y, exact_posterior_guide

from hbjax.diagnostics import (
    ImportanceDiagnostics,
    effective_sample_size,
    importance_diagnostics,
    psis,
)
from hbjax.guide import inverse_softplus


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
    assert effective_sample_size(np.zeros(100)) == pytest.approx(100)
    assert effective_sample_size(np.r_[0.0, np.full(99, -50.0)]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="finite"):
        psis(np.array([0.0, np.nan, 1.0]))


@pytest.mark.usefixtures("standard_promotion")
def test_diagnostics_tell_an_exact_guide_from_a_narrow_one():
    exact = exact_posterior_guide()
    good = importance_diagnostics(MODEL, exact, Y, key=jax.random.key(0), num_draws=400)
    assert good.k_hat < 0.5 and good.ess > 0.99 * 400
    assert good.verdict.startswith("good")
    # a guide 3x too narrow: w ~ exp(x^2 (1 - 1/9) / 2), k = 1 - 1/9 ~ 0.89
    narrow = eqx.tree_at(
        lambda g: g.raw_scale["mu"], exact, inverse_softplus(exact.scale["mu"] / 3)
    )
    bad = importance_diagnostics(MODEL, narrow, Y, key=jax.random.key(0), num_draws=400)
    assert bad.k_hat > 0.7 and bad.ess < 0.5 * 400
    assert bad.verdict.startswith("poor")
    assert set(bad.to_dict()) == {"k_hat", "ess", "num_draws", "verdict"}
    with pytest.raises(ValueError, match="num_draws"):
        importance_diagnostics(MODEL, exact, Y, key=jax.random.key(0), num_draws=5)
    assert ImportanceDiagnostics(0.6, 10.0, 100).verdict.startswith("ok")
