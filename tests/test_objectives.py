import functools
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.scipy.special import logsumexp
from scipy import stats
from tolerances import assert_f32_close, f32_rtol

import hbjax
from hbjax import MeanFieldNormal, elbo, log_weights
from hbjax.vi import layers
from hbjax.vi.objectives import renyi_bound, renyi_elbo


class NormalMean(hbjax.AbstractModel):
    """y_n ~ N(mu, noise), mu = m0 + s0 * z, z ~ N(0, 1): conjugate, evidence in closed form."""

    prior: layers.Normal
    noise: float

    def latent_shapes(self):
        return {"mu": self.prior.latent_shape()}

    def log_prior(self, latents):
        return self.prior.log_prior(latents["mu"])

    def log_likelihood(self, latents, y):
        return jnp.sum(jax.scipy.stats.norm.logpdf(y, self.prior(latents["mu"]), self.noise))


M0, S0, NOISE = 0.5, 2.0, 1.5
Y = jnp.array([1.2, 0.3, 2.5, 1.9, 0.8])
MODEL = NormalMean(layers.Normal(M0, S0), NOISE)


def exact_posterior_guide():
    precision = 1 / S0**2 + len(Y) / NOISE**2
    mean = (M0 / S0**2 + float(Y.sum()) / NOISE**2) / precision
    z_mean, z_sd = (mean - M0) / S0, 1 / (S0 * np.sqrt(precision))
    guide = MeanFieldNormal.from_shapes(MODEL.latent_shapes(), loc={"mu": z_mean}, scale=z_sd)
    return guide


def log_evidence():
    cov = NOISE**2 * np.eye(len(Y)) + S0**2
    return stats.multivariate_normal(np.full(len(Y), M0), cov).logpdf(np.asarray(Y))


def test_exact_posterior_bound_equals_log_evidence():
    guide = exact_posterior_guide()
    key = jax.random.key(0)
    for loss in (
        elbo(MODEL, guide, Y, key=key, num_particles=16),
        renyi_elbo(MODEL, guide, Y, key=key, alpha=0.0, num_particles=16),
        renyi_elbo(MODEL, guide, Y, key=key, alpha=0.5, num_particles=16),
    ):
        # every log weight equals log p(y) exactly; only float32 rounding remains: the log
        # joint and log q, sums over the observations' terms (each at most |log p(y)|)
        assert_f32_close(-float(loss), log_evidence(), terms=4 * (len(Y) + 2))
    log_w = log_weights(MODEL, guide, Y, key=key, num_particles=16)
    assert float(jnp.std(log_w)) < 1e-4


def offset_guide(model, panel=None):
    shapes = model.latent_shapes()
    loc = jax.tree.map(lambda s: jnp.full(s.shape, 0.3, s.dtype), shapes)
    return MeanFieldNormal.from_shapes(shapes, loc=loc, scale=0.5)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 2.0, -1.0])
def test_one_particle_is_the_elbo_for_any_alpha(alpha, small_data, small_model):
    panel = small_data.rows
    guide = offset_guide(small_model)
    key = jax.random.key(3)
    renyi = jax.jit(functools.partial(renyi_elbo, alpha=alpha, num_particles=1))
    got = renyi(small_model, guide, panel, key=key)
    np.testing.assert_array_equal(got, jax.jit(elbo)(small_model, guide, panel, key=key))


def test_alpha_one_is_the_elbo_and_the_limit_is_continuous():
    log_w = jnp.array([-10.0, -12.5, -9.0, -11.0], jnp.float32)
    mean, var = float(log_w.mean()), float(log_w.var())
    assert float(renyi_bound(log_w, 1.0)) == pytest.approx(mean, abs=0)
    for delta in (1e-3, -1e-3, 1e-5):
        # L_alpha = mean + (1 - alpha) var / 2 + O((1 - alpha)^2)
        expected = mean + delta * var / 2
        assert float(renyi_bound(log_w, 1.0 - delta)) == pytest.approx(expected, abs=1e-4)


def test_stable_formula_equals_the_textbook_one(small_data, small_model):
    panel = small_data.rows
    guide = offset_guide(small_model)
    key = jax.random.key(4)
    log_w = log_weights(small_model, guide, panel, key=key, num_particles=8)
    for alpha in (0.0, 0.5, 3.0):
        textbook = (logsumexp((1 - alpha) * log_w) - jnp.log(8.0)) / (1 - alpha)
        got = -renyi_elbo(small_model, guide, panel, key=key, alpha=alpha, num_particles=8)
        # one log-sum-exp of 8 log weights in either form; each weight's own rounding is
        # the same in both, so only the 8-term sum and a few operations differ
        assert_f32_close(got, textbook, terms=16, magnitude=np.abs(np.asarray(log_w)).max())


def test_importance_weighted_bound_tightens_with_k():
    guide = MeanFieldNormal.from_shapes(MODEL.latent_shapes(), loc={"mu": 0.0}, scale=0.3)
    keys = jax.random.split(jax.random.key(5), 2000)

    def bound(k, key):
        return -renyi_elbo(MODEL, guide, Y, key=key, alpha=0.0, num_particles=k)

    # the same keys for every K: paired differences have a small Monte Carlo error
    values = {k: np.asarray(jax.vmap(functools.partial(bound, k))(keys)) for k in (1, 4, 16)}
    for small, large in ((1, 4), (4, 16)):
        diff = values[large] - values[small]
        se = diff.std(ddof=1) / np.sqrt(len(diff))
        assert diff.mean() > 4 * se, (small, large, diff.mean(), se)
    for k, v in values.items():  # still a lower bound on log p(y), in expectation
        assert v.mean() < log_evidence() + 4 * v.std(ddof=1) / np.sqrt(len(v)), k


def test_gradients_match_finite_differences(small_data, small_model):
    panel = small_data.rows
    guide = offset_guide(small_model)
    key = jax.random.key(6)
    params, static = eqx.partition(guide, eqx.is_inexact_array)

    @jax.jit
    def loss(p):
        g = eqx.combine(p, static)
        return renyi_elbo(small_model, g, panel, key=key, alpha=0.0, num_particles=4)

    grads = jax.grad(loss)(params)
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(0)
    for trial in range(3):
        direction = [jnp.asarray(rng.standard_normal(x.shape), jnp.float32) for x in leaves]
        norm = np.sqrt(sum(float(jnp.sum(d**2)) for d in direction))
        direction = [d / norm for d in direction]
        eps = 1e-2

        def shifted(sign, direction=direction):
            moved = [x + sign * eps * d for x, d in zip(leaves, direction, strict=True)]
            return float(loss(jax.tree.unflatten(treedef, moved)))

        numeric = (shifted(1.0) - shifted(-1.0)) / (2 * eps)
        analytic = sum(
            float(jnp.sum(g * d)) for g, d in zip(jax.tree.leaves(grads), direction, strict=True)
        )
        # float32 rounding of the loss (|L| * 2^-23 each side) dominates the error budget
        value = abs(float(loss(params)))
        tolerance = 20 * value * 2.0**-23 / eps + 1e-3 * abs(analytic)
        assert abs(numeric - analytic) < tolerance, (trial, numeric, analytic, tolerance)


def test_num_particles_validated():
    guide = exact_posterior_guide()
    with pytest.raises(ValueError, match="num_particles"):
        renyi_elbo(MODEL, guide, Y, key=jax.random.key(0), num_particles=0)


def _guide_grads(guide, **options):
    def loss(g, key):
        return renyi_elbo(MODEL, g, Y, key=key, **options)

    grad = eqx.filter_jit(eqx.filter_grad(loss))
    keys = jax.random.split(jax.random.key(7), 400)
    grads = [grad(guide, k) for k in keys]
    return np.stack([np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]) for g in grads])


@pytest.mark.parametrize(
    "options",
    [{"alpha": 1.0, "gradient": "stl"}, {"alpha": 0.0, "gradient": "dreg", "num_particles": 4}],
)
def test_stl_and_dreg_gradients_vanish_at_the_exact_posterior(options):
    # log p(y, z) - log q(z) is constant in z when q is the posterior: the path gradient
    # is zero for every draw, while the total gradient keeps a zero-mean score term.
    guide = exact_posterior_guide()
    assert np.max(np.abs(_guide_grads(guide, **options))) < 1e-4
    total = _guide_grads(
        guide, alpha=options["alpha"], num_particles=options.get("num_particles", 1)
    )
    assert np.std(total, axis=0).max() > 0.1


@pytest.mark.parametrize(("alpha", "gradient"), [(1.0, "stl"), (0.0, "dreg")])
def test_stl_and_dreg_are_unbiased_away_from_the_posterior(alpha, gradient):
    # E[STL] = E[total] (the dropped score term has mean zero) and E[DReG] = E[IW total]:
    # the means over 400 draws agree within 4 standard errors of their difference.
    guide = exact_posterior_guide()
    guide = eqx.tree_at(lambda g: g.loc["mu"], guide, guide.loc["mu"] + 0.8)
    guide = eqx.tree_at(lambda g: g.raw_scale["mu"], guide, guide.raw_scale["mu"] + 0.7)
    total = _guide_grads(guide, alpha=alpha, num_particles=4)
    other = _guide_grads(guide, alpha=alpha, num_particles=4, gradient=gradient)
    diff = other - total  # same keys: paired differences
    se = diff.std(axis=0, ddof=1) / np.sqrt(len(diff))
    assert np.all(np.abs(diff.mean(axis=0)) < 4 * se + 1e-6), (diff.mean(axis=0), se)
    assert np.all(other.std(axis=0) < total.std(axis=0))  # and here, less noisy


def test_gradient_estimator_does_not_change_the_value_and_is_validated():
    guide = exact_posterior_guide()
    guide = eqx.tree_at(lambda g: g.loc["mu"], guide, guide.loc["mu"] + 0.8)
    key = jax.random.key(3)
    values = [
        float(renyi_elbo(MODEL, guide, Y, key=key, alpha=0.0, gradient=g))
        for g in ("total", "dreg")
    ]
    # the same log weights; the estimators differ in where stop_gradient goes, so the
    # traced programs (and their float32 rounding of the particles' log-sum-exp) may differ
    np.testing.assert_allclose(values, values[0], rtol=f32_rtol(terms=4 * (len(Y) + 2)))
    with pytest.raises(ValueError, match="alpha = 0"):
        renyi_elbo(MODEL, guide, Y, key=key, alpha=0.5, gradient="dreg")
    with pytest.raises(ValueError, match="biased"):
        renyi_elbo(MODEL, guide, Y, key=key, alpha=0.0, num_particles=4, gradient="stl")
    with pytest.raises(ValueError, match="gradient must be one of total, stl, dreg"):
        renyi_elbo(MODEL, guide, Y, key=key, gradient="reinforce")
    with pytest.raises(ValueError, match="particle_map must be one of auto, sequential"):
        renyi_elbo(MODEL, guide, Y, key=key, particle_map="parallel")


def test_objectives_and_gradient_estimators_are_modules_checked_when_built():
    guide = exact_posterior_guide()
    guide = eqx.tree_at(lambda g: g.loc["mu"], guide, guide.loc["mu"] + 0.8)
    key = jax.random.key(5)
    for gradient in ("total", "dreg"):  # the module is the function's objective
        bound = hbjax.RenyiBound(alpha=0.0, num_particles=4, gradient=gradient)
        assert isinstance(bound.gradient, hbjax.vi.objectives.GRADIENTS[gradient])
        np.testing.assert_array_equal(
            bound(MODEL, guide, Y, key=key),
            renyi_elbo(MODEL, guide, Y, key=key, num_particles=4, gradient=gradient),
        )
    with pytest.raises(ValueError, match="alpha = 0"):  # at construction, before any data
        hbjax.RenyiBound(alpha=0.5, gradient=hbjax.vi.objectives.DReG())
    with pytest.raises(ValueError, match="biased"):
        hbjax.RenyiBound(num_particles=2, gradient="stl")
    with pytest.raises(ValueError, match="num_particles must be an integer >= 1"):
        hbjax.RenyiBound(num_particles=0)

    class Halved(hbjax.vi.objectives.AbstractGradient):  # a researcher's own estimator
        stop_score: ClassVar[bool] = False

        def loss(self, log_w, alpha):
            return -0.5 * renyi_bound(log_w, alpha)

    def value_and_grad(gradient):
        bound = hbjax.RenyiBound(num_particles=4, gradient=gradient)
        value, grad = eqx.filter_value_and_grad(lambda g: bound(MODEL, g, Y, key=key))(guide)
        return float(value), np.concatenate([np.ravel(x) for x in jax.tree.leaves(grad)])

    (total, total_grad), (half, half_grad) = value_and_grad("total"), value_and_grad(Halved())
    # halving is exact in binary floating point; the two programs may still fuse the sums
    # over particles and observations in other orders
    rtol = f32_rtol(terms=4 * (len(Y) + 2))
    np.testing.assert_allclose(half, 0.5 * total, rtol=rtol)
    assert_f32_close(half_grad, 0.5 * total_grad, terms=4 * (len(Y) + 2))
    assert np.abs(total_grad).max() > 0.1  # away from the posterior: a gradient to halve

    class NoLoss(hbjax.vi.objectives.AbstractGradient):
        stop_score: ClassVar[bool] = True

    class NoStopScore(hbjax.vi.objectives.AbstractGradient):
        def loss(self, log_w, alpha):
            return -renyi_bound(log_w, alpha)

    for incomplete in (NoLoss, NoStopScore):
        with pytest.raises(TypeError):
            incomplete()
    described = [
        hbjax.vi.checkpoint.describe(hbjax.RenyiBound(alpha=a, gradient="total")) for a in (0, 0.5)
    ]
    assert described[0] != described[1]  # a resume with another alpha is refused


def test_alpha_may_be_an_array_a_traced_value_or_a_schedule():
    """The bound at a traced alpha is the textbook's (the ELBO's mean exactly at 1, with the
    ELBO's gradient); a RenyiBound's alpha may be an array (vmap over alphas) or a schedule
    of the step, whose value at each step is the fixed-alpha bound's."""
    log_w = jnp.array([-10.0, -12.5, -9.0, -11.0], jnp.float32)
    wide = np.asarray(log_w, np.float64)
    traced = jax.jit(renyi_bound)
    for alpha in (0.0, 0.5, 1.0 - 1e-3, 1.0, 3.0):
        textbook = (
            wide.mean()
            if alpha == 1.0
            else (float(logsumexp((1 - alpha) * wide)) - np.log(4.0)) / (1 - alpha)
        )
        # a log-sum-exp of 4 terms of size ~12 in float32 (expm1 near alpha 1: a few more)
        assert float(traced(log_w, jnp.float32(alpha))) == pytest.approx(textbook, abs=1e-4)
    # d mean / d log w_k at s = 1 - alpha = 0, also where exp(log w - min) overflows (the
    # branch where() drops must stay finite, or its gradient poisons the kept one)
    spread = jnp.array([-1000.0, -1010.0, -900.0, -1005.0], jnp.float32)
    np.testing.assert_allclose(jax.grad(renyi_bound)(spread, jnp.float32(1.0)), 0.25)

    guide = exact_posterior_guide()
    guide = eqx.tree_at(lambda g: g.loc["mu"], guide, guide.loc["mu"] + 0.8)
    key = jax.random.key(6)
    alphas = jnp.array([0.0, 0.5, 1.0])
    vmapped = jax.vmap(
        lambda a: hbjax.RenyiBound(alpha=a, num_particles=4)(MODEL, guide, Y, key=key)
    )
    fixed = [
        hbjax.RenyiBound(alpha=float(a), num_particles=4)(MODEL, guide, Y, key=key) for a in alphas
    ]
    assert_f32_close(vmapped(alphas), np.array(fixed), terms=4 * (len(Y) + 2))
    schedule = optax.linear_schedule(1.0, 0.0, 100)
    scheduled = hbjax.RenyiBound(alpha=schedule, schedule_end=100, num_particles=4)
    assert scheduled.settled_at == 100 and hbjax.RenyiBound().settled_at == 0
    assert "schedule(1 -> 0 at step 100)" in repr(scheduled)  # in a checkpoint's fingerprint
    for step, alpha in ((0, 1.0), (50, 0.5), (100, 0.0), (400, 0.0), (None, 0.0)):
        got = scheduled(MODEL, guide, Y, key=key, step=step if step is None else jnp.int32(step))
        want = hbjax.RenyiBound(alpha=alpha, num_particles=4)(MODEL, guide, Y, key=key)
        assert_f32_close(got, want, terms=4 * (len(Y) + 2))
    with pytest.raises(ValueError, match="needs schedule_end"):
        hbjax.RenyiBound(alpha=schedule)
    with pytest.raises(ValueError, match="got alpha = an array or a schedule"):
        hbjax.RenyiBound(alpha=schedule, schedule_end=100, gradient="dreg")
    with pytest.raises(ValueError, match="needs a scheduled alpha"):
        hbjax.RenyiBound(alpha=0.0, schedule_end=100)
