"""The article's NumPyro set-up, as the comparator (``pip install -e ".[bench]"``).

Model, reparameterisation, guide, loss and optimiser as in the article: LocScaleReparam
on every site, AutoNormal, RenyiELBO(num_particles=4), adamw with
``exponential_decay(0.01, 1000, 0.99, end_value=1e-5)``, the log-demand clipped to
[-4, 20], one device (``parallel=False``). hbjax never imports this module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pandas as pd
from numpyro.infer import SVI, RenyiELBO, autoguide
from numpyro.infer.reparam import LocScaleReparam


def make_data(frame: pd.DataFrame) -> dict:
    """The article's ``create_dict`` (without padding: one device)."""
    product_idx, products = pd.factorize(frame["product"])
    cat_idx, _ = pd.factorize(frame["category"])
    time_cat = frame["category"].astype(str) + "_" + frame["period"].astype(str)
    time_cat_idx, time_cats = pd.factorize(time_cat)
    pairs = pd.DataFrame({"product": product_idx, "category": cat_idx}).drop_duplicates()
    return {
        "product_idx": jnp.asarray(product_idx, jnp.int32),
        "time_cat_idx": jnp.asarray(time_cat_idx, jnp.int32),
        "log_price": jnp.asarray(np.log(frame["price"].to_numpy()), jnp.float32),
        "product_to_category": jnp.asarray(pairs.sort_values("product")["category"].to_numpy()),
        "outcome": jnp.asarray(frame["units_sold"].to_numpy(), jnp.int32),
        "n_obs": len(frame),
        "n_product": len(products),
        "n_cat": int(cat_idx.max()) + 1,
        "n_time_cat": len(time_cats),
        "products": products,
    }


def model(data: dict, outcome: jnp.ndarray | None = None) -> None:
    """The article's model (``parallel=False``)."""
    reparam = {"reparam": LocScaleReparam()}
    global_a = numpyro.sample("global_a", dist.Normal(-2, 1), infer=reparam)
    with numpyro.plate("category", data["n_cat"]):
        category_a = numpyro.sample("category_a", dist.Normal(global_a, 1), infer=reparam)
    with numpyro.plate("product", data["n_product"]):
        product_a = numpyro.sample(
            "product_a", dist.Normal(category_a[data["product_to_category"]], 2), infer=reparam
        )
        product_effect = numpyro.sample("product_effect", dist.Normal(0, 3), infer=reparam)
    with numpyro.plate("time_cat", data["n_time_cat"]):
        time_cat_effects = numpyro.sample("time_cat_effects", dist.Normal(0, 3), infer=reparam)
    log_demand = (
        product_a[data["product_idx"]] * data["log_price"]
        + time_cat_effects[data["time_cat_idx"]]
        + product_effect[data["product_idx"]]
    )
    demand = jnp.exp(jnp.clip(log_demand, -4, 20))
    with numpyro.plate("data", size=data["n_obs"]):
        numpyro.sample("obs", dist.Poisson(demand), obs=outcome)


def make_svi(data: dict) -> tuple[SVI, autoguide.AutoNormal]:
    """SVI with the article's guide, loss and optimiser."""
    guide = autoguide.AutoNormal(model)
    schedule = optax.exponential_decay(
        init_value=0.01, transition_steps=1000, decay_rate=0.99, staircase=False, end_value=1e-5
    )
    svi = SVI(model, guide, optax.adamw(learning_rate=schedule), loss=RenyiELBO(num_particles=4))
    return svi, guide


def static_data(data: dict) -> dict:
    """The data dict without host-only entries (what the model sees)."""
    return {k: v for k, v in data.items() if k != "products"}


def elasticities(guide: autoguide.AutoNormal, params: dict, data: dict) -> np.ndarray:
    """Posterior median product elasticities (natural scale), in ``data["products"]`` order."""
    median = guide.median(params)
    seeded = numpyro.handlers.seed(numpyro.handlers.substitute(model, data=median), 0)
    trace = numpyro.handlers.trace(seeded).get_trace(static_data(data), None)
    return np.asarray(trace["product_a"]["value"])


def run_steps(svi: SVI, data: dict, steps: int):  # noqa: ANN201
    """A jitted ``lax.scan`` over ``steps`` SVI updates, ``state -> (state, losses)``.

    The data is closed over, as ``SVI.run`` does (its plate sizes must stay static).
    """
    data = static_data(data)

    def body(state):  # noqa: ANN001, ANN202
        return jax.lax.scan(
            lambda s, _: svi.update(s, data, data["outcome"]), state, None, length=steps
        )

    return jax.jit(body)
