"""hbjax layers inside your own JAX/Equinox model.

A hierarchical linear regression (schools within districts) written with hbjax's
non-centred layers, fitted with hbjax's mean-field guide, Rényi objective and ``fit``. The
layers are plain Equinox modules: the model below is ~30 lines and needs no hbjax internals.

Run: ``python examples/layers_in_your_model.py`` (``--short`` for a quick check).
"""

import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import hbjax
from hbjax.vi import layers


class SchoolLatents(eqx.Module):
    overall: jax.Array
    district: jax.Array
    school: jax.Array


class SchoolModel(hbjax.AbstractModel):
    """score ~ N(school mean, 1); school ~ N(district, 0.5); district ~ N(overall, 1)."""

    overall: layers.Normal
    district: layers.Nested
    school: layers.Nested

    def __init__(self, school_district: np.ndarray, n_districts: int):
        self.overall = layers.Normal(0.0, 5.0)
        self.district = layers.Nested(1.0, shape=(n_districts,))
        self.school = layers.Nested(0.5, index=school_district)

    def latent_shapes(self):
        return SchoolLatents(
            self.overall.latent_shape(), self.district.latent_shape(), self.school.latent_shape()
        )

    def log_prior(self, z):
        return (
            self.overall.log_prior(z.overall)
            + self.district.log_prior(z.district)
            + self.school.log_prior(z.school)
        )

    def natural(self, z):
        overall = self.overall(z.overall)
        district = self.district(z.district, overall)
        return SchoolLatents(overall, district, self.school(z.school, district))

    def log_likelihood(self, z, data):
        school_mean = self.natural(z).school[data["school"]]
        return jnp.sum(jax.scipy.stats.norm.logpdf(data["score"], school_mean, 1.0))


def main(short: bool = False) -> None:
    rng = np.random.default_rng(0)
    n_districts, n_schools, n_pupils = 5, 40, 300
    school_district = rng.integers(0, n_districts, n_schools).astype(np.int32)
    district_true = 3.0 + rng.normal(0, 1, n_districts)
    school_true = district_true[school_district] + rng.normal(0, 0.5, n_schools)
    school = rng.integers(0, n_schools, n_pupils).astype(np.int32)
    data = {"school": school, "score": (school_true[school] + rng.normal(0, 1, n_pupils))}
    data = jax.tree.map(jnp.asarray, data)

    model = SchoolModel(school_district, n_districts)
    guide = hbjax.MeanFieldNormal.from_shapes(model.latent_shapes())
    result = hbjax.fit(
        model, guide, data, key=jax.random.key(0), steps=200 if short else 3000, progress=not short
    )
    estimate = model.natural(result.guide.loc).school
    rmse = float(jnp.sqrt(jnp.mean((estimate - school_true) ** 2)))
    raw = np.bincount(school, np.asarray(data["score"])) / np.maximum(np.bincount(school), 1)
    print(
        f"school means: hierarchical RMSE {rmse:.3f} vs raw averages "
        f"{np.sqrt(np.mean((raw - school_true) ** 2)):.3f}"
    )


if __name__ == "__main__":
    main(short="--short" in sys.argv)
