"""Your own model, sharded over devices and minibatched: no hbjax internals.

A hierarchical linear regression (not a count model): pupils' scores within schools within
districts, each school with its own intercept and slope on hours of homework. Schools are
the units. The model says what its latents are, which of them are per school, its priors
and each row's log density; ``hbjax.fit`` then splits the rows over devices in blocks of
whole schools (``hbjax.FullBatch(rows, mesh)``) or draws whole schools each step
(``hbjax.Minibatches(rows, batch_size, mesh=mesh)``).

Run: ``python examples/own_model_sharded.py`` (``--short`` for a quick check). On a
machine with one CPU device, set
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` to see four devices.
"""

import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import hbjax
from hbjax.vi import layers


class SchoolLatents(eqx.Module):
    overall: jax.Array  # []
    district: jax.Array  # [district]
    log_noise: jax.Array  # []: log of the pupils' sd
    intercept: jax.Array  # [school]
    slope: jax.Array  # [school]


class SchoolModel(hbjax.AbstractRowModel):
    """score = a_s + b_s (hours - 5) + N(0, sigma).

    School intercepts ``a_s ~ N(a_d, 3)`` around their district's ``a_d ~ N(a, 5)``;
    slopes ``b_s ~ N(0.3, 0.2)``.
    """

    overall: layers.Normal
    slope: layers.Normal
    log_noise: layers.Normal
    school_district: jax.Array  # [school]
    n_districts: int = eqx.field(static=True)

    def __init__(self, school_district: np.ndarray, n_districts: int):
        self.overall = layers.Normal(50.0, 20.0)
        self.n_districts = n_districts
        self.school_district = jnp.asarray(school_district, jnp.int32)
        self.slope = layers.Normal(0.3, 0.2, shape=(len(school_district),))
        self.log_noise = layers.Normal(2.0, 1.0)

    def latent_shapes(self):
        return SchoolLatents(
            self.overall.latent_shape(),
            jax.ShapeDtypeStruct((self.n_districts,), jnp.float32),  # centred: natural values
            self.log_noise.latent_shape(),
            jax.ShapeDtypeStruct(self.school_district.shape, jnp.float32),  # centred
            self.slope.latent_shape(),
        )

    def unit_leaves(self):
        return SchoolLatents(False, False, False, True, True)

    def shared_log_prior(self, z):
        return (
            self.overall.log_prior(z.overall)
            + jnp.sum(layers.normal_log_prob(z.district, self.overall(z.overall), 5.0))
            + self.log_noise.log_prior(z.log_noise)
        )

    def unit_log_prior(self, z):
        # districts and intercepts are centred (natural values): the data pin them down
        intercept = layers.normal_log_prob(z.intercept, z.district[self.school_district], 3.0)
        return intercept + self.slope.log_prior_terms(z.slope)

    def row_log_likelihood(self, z, rows):
        intercept = z.intercept[rows.unit]
        slope = self.slope(z.slope)[rows.unit]
        mean = intercept + slope * (rows.columns["hours"] - 5.0)
        sd = jnp.exp(self.log_noise(z.log_noise))
        return layers.normal_log_prob(rows.columns["score"], mean, sd)

    def restrict(self, units):
        return eqx.tree_at(
            lambda m: (m.school_district, m.slope),
            self,
            (self.school_district[units], layers.Normal(0.3, 0.2, shape=units.shape)),
        )

    def init_latents(self, rows):
        """Intercepts at their school's mean score, districts at their schools' average."""
        unit, district = np.asarray(rows.unit), np.asarray(self.school_district)
        pupils = np.maximum(np.bincount(unit, minlength=len(district)), 1)
        means = np.bincount(unit, np.asarray(rows.columns["score"]), len(pupils)) / pupils
        schools = np.maximum(np.bincount(district, minlength=self.n_districts), 1)
        centres = np.bincount(district, means, self.n_districts) / schools
        start = super().init_latents(rows)
        return eqx.tree_at(
            lambda z: (z.district, z.intercept),
            start,
            (jnp.asarray(centres, jnp.float32), jnp.asarray(means, jnp.float32)),
        )


def simulate(rng, n_schools=400, n_districts=8, pupils=(20, 100)):
    school_district = rng.integers(0, n_districts, n_schools)
    district = 50.0 + rng.normal(0, 5, n_districts)
    intercept = district[school_district] + rng.normal(0, 3, n_schools)
    slope = 0.3 + rng.normal(0, 0.2, n_schools)
    school = np.repeat(np.arange(n_schools), rng.integers(*pupils, n_schools))
    hours = rng.uniform(0, 10, len(school)).astype(np.float32)
    score = intercept[school] + slope[school] * (hours - 5) + rng.normal(0, 3, len(school))
    rows = hbjax.UnitRows.build(
        school, {"hours": hours, "score": score.astype(np.float32)}, n_units=n_schools
    )
    return rows, school_district, slope


def main(short: bool = False) -> None:
    rng = np.random.default_rng(0)
    rows, school_district, true_slope = simulate(rng)
    model = SchoolModel(school_district, int(school_district.max()) + 1)
    mesh = hbjax.make_mesh()  # every device
    steps = 300 if short else 20_000
    for label, source in (
        (f"sharded over {mesh.size} device(s)", hbjax.FullBatch(rows, mesh)),
        ("minibatches of 40 schools", hbjax.Minibatches(rows, batch_size=40, mesh=mesh)),
    ):
        guide = hbjax.make_guide("unitblock", model, loc=model.init_latents(rows))
        result = hbjax.fit(
            model, guide, source, key=jax.random.key(0), steps=steps, progress=not short
        )
        slope = model.slope(result.guide.mean().slope)
        rmse = float(np.sqrt(np.mean((np.asarray(slope) - true_slope) ** 2)))
        print(
            f"{label}: {result.steps} steps, converged {result.converged}; school slopes "
            f"RMSE {rmse:.3f} (prior sd 0.2)"
        )


if __name__ == "__main__":
    main(short="--short" in sys.argv)
