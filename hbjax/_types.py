"""jaxtyping aliases with named dimensions.

Dimension names used across hbjax:

* ``obs``: observation rows (unit × period cells that were observed, plus padding);
* ``unit``: units (products);
* ``group``: groups (categories);
* ``period``: periods;
* ``cell``: flattened (group, period) pairs, ``group * n_periods + period``;
* ``particle``: importance-sampling particles / posterior draws.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jaxtyping import Bool, Float, Int, PRNGKeyArray, PyTree, Scalar


def float_dtype() -> np.dtype:
    """The floats of latents, guides, rows and kernels: float64 or float32.

    float64 where JAX's x64 is on (``jax.config.update("jax_enable_x64", True)`` or
    ``JAX_ENABLE_X64=1``), else float32.
    """
    return np.dtype(jnp.result_type(float))


#: Host (numpy) or device (jax) array: data starts on the host and moves to devices.
AnyArray = Array | np.ndarray

#: What a latent pytree's leaves may hold: device or host values, or just shapes.
LatentLeaf = Array | np.ndarray | np.number | jax.ShapeDtypeStruct  # np.number: host scalars

ObsFloat = Float[AnyArray, "obs"]
ObsInt = Int[AnyArray, "obs"]
UnitInt = Int[AnyArray, "unit"]
UnitFloat = Float[Array, "unit"]
CellFloat = Float[Array, "cell"]
ParticleFloat = Float[Array, "particle"]

__all__ = [
    "AnyArray",
    "Array",
    "Bool",
    "CellFloat",
    "Float",
    "Int",
    "LatentLeaf",
    "ObsFloat",
    "ObsInt",
    "PRNGKeyArray",
    "ParticleFloat",
    "PyTree",
    "Scalar",
    "UnitFloat",
    "UnitInt",
]
