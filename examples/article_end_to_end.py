"""The article's workflow end to end, on simulated data: table -> fit -> elasticities.

Equivalent to ``hbjax demo`` but written with the Python API, as an analyst would:
a DataFrame in, a DataFrame of product elasticities with 90% intervals out.

Run: ``python examples/article_end_to_end.py`` (``--short`` for a quick check).
"""

import sys

import jax
import numpy as np

import hbjax


def main(short: bool = False) -> None:
    sim = hbjax.simulate(n_units=100 if short else 2000, n_periods=52, n_groups=10, seed=0)
    data = hbjax.counts.elasticity_data(  # the article's model and priors
        sim.frame,
        unit="product",
        groups=("category",),
        period="period",
        price="price",
        counts="units_sold",
    )
    model = data.model
    guide = hbjax.MeanFieldNormal.from_shapes(
        model.latent_shapes(), loc=model.init_latents(data.rows)
    )
    result = hbjax.fit(
        model,
        guide,
        data.rows,
        key=jax.random.key(42),
        steps=100 if short else 6000,
        optimizer=hbjax.default_optimizer(0.01, precondition=False),  # the article's AdamW
        progress=not short,
    )
    tables = data.summary(result.guide)  # exact for a Gaussian guide: no draws
    units = tables["log_price/unit"].reset_index(names="product")
    units = units.merge(sim.truth, on="product")
    rmse = np.sqrt(np.mean((units["mean"] - units["elasticity"]) ** 2))
    print(f"{result.iterations_per_second:.0f} it/s; elasticity RMSE {rmse:.3f}")
    print(tables["log_price/global"].to_string())
    print(units.sort_values("mean").head().to_string(index=False))


if __name__ == "__main__":
    main(short="--short" in sys.argv)
