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
    panel, encoding = hbjax.from_frame(
        sim.frame,
        unit="product",
        group="category",
        period="period",
        price="price",
        units="units_sold",
    )
    model = hbjax.ElasticityModel.from_panel(panel)  # the article's priors
    guide = hbjax.MeanFieldNormal.from_shapes(model.latent_shapes(), loc=model.init_latents(panel))
    result = hbjax.fit(
        model,
        guide,
        panel,
        key=jax.random.key(42),
        steps=100 if short else 6000,
        optimizer=hbjax.default_optimizer(0.01),  # adamw + the article's exponential decay
        progress=not short,
    )
    summary = hbjax.summarize(result, encoding, num_samples=200 if short else 1000)
    units = summary.units.merge(sim.truth, on=["product", "category"])
    rmse = np.sqrt(np.mean((units["mean"] - units["elasticity"]) ** 2))
    print(f"{result.iterations_per_second:.0f} it/s; elasticity RMSE {rmse:.3f}")
    print(summary.overall.to_string(index=False))
    print(summary.units.sort_values("mean").head().to_string(index=False))


if __name__ == "__main__":
    main(short="--short" in sys.argv)
