"""A composed guide: full-rank over the shared latents, unit-block over the products.

The elasticity model's shared latents (global and category elasticities, week effects)
get one joint normal (a :class:`hbjax.LowRankNormal` of full rank); each product's
elasticity and intercept a 2x2 block (:class:`hbjax.UnitBlockNormal`). The parts learn at
their own rates (``optax.multi_transform`` with :func:`hbjax.vi.guide.part_labels`), and
``hbjax.fit``, its convergence rule and the exact summaries work unchanged.

Run: ``python examples/composed_guide.py`` (``--short`` for a quick check).
"""

import sys

import equinox as eqx
import jax
import optax

import hbjax
from hbjax.vi.guide import ComposedGuide, part_labels

short = "--short" in sys.argv
data = hbjax.counts.elasticity_data(hbjax.simulate(n_units=60, n_periods=20, n_groups=4).frame)
model = data.model
shapes, units = model.latent_shapes(), model.unit_leaves()
shared = jax.tree.map(lambda unit: not unit, units)
loc = model.init_latents(data.rows)
n_shared = sum(s.size for s in jax.tree.leaves(eqx.filter(shapes, shared)))
parts = {
    "shared": hbjax.LowRankNormal.from_shapes(
        eqx.filter(shapes, shared),
        rank=n_shared,
        key=jax.random.key(1),
        loc=eqx.filter(loc, shared),
    ),
    "units": hbjax.UnitBlockNormal.from_shapes(
        eqx.filter(shapes, units), eqx.filter(units, units), loc=eqx.filter(loc, units)
    ),
}
guide = ComposedGuide(parts, {"shared": shared, "units": units})
# the full factor learns slowly: at 3e-3 its steps add more noise than the week effects'
# posterior sds (20,000 steps unconverged, categories 1-2 off); at 5e-4, 5,100 steps
rates = {"shared": optax.adam(5e-4), "units": optax.adam(1e-2)}
optimizer = optax.multi_transform(rates, part_labels(guide))
result = hbjax.fit(
    model,
    guide,
    data.rows,
    key=jax.random.key(0),
    steps=300 if short else 20_000,
    optimizer=optimizer,
    progress=False,
)
print(f"{result.steps} steps, converged: {result.converged}")
print(data.summary(result.guide)["log_price/category"].round(3))
