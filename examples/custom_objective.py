"""A variational objective of your own, passed to ``hbjax.fit``.

An objective is a plain function ``(model, guide, panel, *, key) -> loss``. This one is the
importance-weighted bound written out from :func:`hbjax.log_weights` (checked against
:func:`hbjax.vi.objectives.renyi_elbo`), and then a variant with a temperature on the log weights
(``T > 1`` flattens them: between the IW bound at ``T = 1`` and the ELBO as ``T`` grows),
fitted to the article's model and compared with the built-in objective.

Run: ``python examples/custom_objective.py`` (``--short`` for a quick check).
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

import hbjax


def iw_bound(model, guide, panel, *, key, num_particles=4):
    """-log mean_k w_k: the importance-weighted bound, as a loss to minimise."""
    log_w = hbjax.log_weights(model, guide, panel, key=key, num_particles=num_particles)
    return -(jax.nn.logsumexp(log_w) - jnp.log(num_particles))


def tempered_iw_bound(model, guide, panel, *, key, num_particles=4, temperature=2.0):
    """-T log mean_k w_k^(1/T): T = 1 is the IW bound, T -> infinity the ELBO."""
    log_w = hbjax.log_weights(model, guide, panel, key=key, num_particles=num_particles)
    return -temperature * (jax.nn.logsumexp(log_w / temperature) - jnp.log(num_particles))


def main(short: bool) -> None:
    sim = hbjax.simulate(n_units=60 if short else 500, n_periods=52, n_groups=4, seed=3)
    data = hbjax.counts.elasticity_data(sim.frame)
    model, panel = data.model, data.rows
    guide = hbjax.make_guide("unitblock", model, loc=model.init_latents(panel))
    key = jax.random.key(0)

    ours = float(iw_bound(model, guide, panel, key=key))
    built_in = float(
        hbjax.vi.objectives.renyi_elbo(model, guide, panel, key=key, alpha=0.0, num_particles=4)
    )
    print(
        f"IW bound from log_weights: {ours:.3f}; "
        f"hbjax.vi.objectives.renyi_elbo(alpha=0): {built_in:.3f}"
    )
    assert np.isclose(ours, built_in, rtol=1e-5)

    truth = sim.truth.set_index("product").loc[data.units, "elasticity"].to_numpy()
    steps = 150 if short else 3000
    for name, objective in (
        ("renyi_elbo (built in)", None),
        ("tempered IW, T=2", tempered_iw_bound),
    ):
        with jax.numpy_dtype_promotion("standard"):
            result = hbjax.fit(
                model, guide, panel, key=key, steps=steps, objective=objective, progress=False
            )
        units = data.summary(result.guide, draws=500)["log_price/unit"]
        rmse = np.sqrt(np.mean((units["mean"] - truth) ** 2))
        covered = np.mean((units["q05"] <= truth) & (truth <= units["q95"]))
        print(f"{name:>22}: RMSE {rmse:.3f}, 90% coverage {covered:.1%}, {steps} steps")


if __name__ == "__main__":
    main(short="--short" in sys.argv)
