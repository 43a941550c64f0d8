"""A guide of your own: independent Student-t latents, an Equinox module.

A guide subclasses :class:`hbjax.AbstractGuide` and implements ``sample`` and ``log_prob``
(``sample_and_log_prob`` comes for free). Heavier tails than a normal are a cheap hedge
against a posterior whose tails the normal guides miss. Its ``loc`` mirrors the model's
latents, so ``CountData.summary`` and the model's ``natural`` work unchanged.

Run: ``python examples/custom_guide.py`` (``--short`` for a quick check).
"""

import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import hbjax


class StudentTGuide(hbjax.AbstractGuide):
    """z = loc + softplus(raw_scale) * t, t ~ Student-t(df), independently per latent."""

    loc: jax.Array  # a pytree like the latents (here: hbjax.counts.CountLatents)
    raw_scale: jax.Array
    df: float = eqx.field(static=True)

    @classmethod
    def from_model(cls, model, loc, *, df=5.0, scale=0.1):
        raw = hbjax.vi.guide.inverse_softplus(jnp.float32(scale))
        raw_scale = jax.tree.map(lambda s: jnp.full(s.shape, raw), model.latent_shapes())
        return cls(loc=loc, raw_scale=raw_scale, df=df)

    def sample(self, num_particles, *, key):
        leaves, treedef = jax.tree.flatten(self.loc)
        keys = jax.random.split(key, len(leaves))
        scales = jax.tree.leaves(jax.tree.map(jax.nn.softplus, self.raw_scale))
        draws = [
            loc + scale * jax.random.t(k, self.df, (num_particles, *loc.shape))
            for loc, scale, k in zip(leaves, scales, keys, strict=True)
        ]
        return jax.tree.unflatten(treedef, draws)

    def log_prob(self, particles, weights=None):
        if weights is not None:  # only an hbjax.AbstractMinibatchGuide is given weights
            raise TypeError("this example guide does not minibatch")

        def leaf(z, loc, raw):
            scale = jax.nn.softplus(raw)
            log_q = jax.scipy.stats.t.logpdf((z - loc) / scale, self.df) - jnp.log(scale)
            return jnp.sum(log_q.reshape(z.shape[0], -1), axis=1)

        per_leaf = jax.tree.leaves(jax.tree.map(leaf, particles, self.loc, self.raw_scale))
        return sum(per_leaf[1:], per_leaf[0])


def main(short: bool) -> None:
    sim = hbjax.simulate(n_units=60 if short else 500, n_periods=52, n_groups=4, seed=4)
    data = hbjax.counts.elasticity_data(sim.frame)
    model, panel = data.model, data.rows
    start = model.init_latents(panel)
    truth = sim.truth.set_index("product").loc[data.units, "elasticity"].to_numpy()
    steps = 150 if short else 3000
    for name, guide in (
        ("Student-t (ours)", StudentTGuide.from_model(model, start)),
        ("mean-field normal", hbjax.make_guide("meanfield", model, loc=start)),
    ):
        with jax.numpy_dtype_promotion("standard"):
            result = hbjax.fit(
                model, guide, panel, key=jax.random.key(0), steps=steps, progress=False
            )
        units = data.summary(result.guide, draws=500)["log_price/unit"]
        rmse = np.sqrt(np.mean((units["mean"] - truth) ** 2))
        covered = np.mean((units["q05"] <= truth) & (truth <= units["q95"]))
        print(
            f"{name:>18}: final loss {result.final_loss:.1f}, RMSE {rmse:.3f}, "
            f"90% coverage {covered:.1%}"
        )


if __name__ == "__main__":
    main(short="--short" in sys.argv)
