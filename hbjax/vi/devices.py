"""Arrays between the host and the devices: replicated placement, host copies, seeds.

What the fitting loop needs of devices, whatever the data's layout (the layouts and block
plans are :mod:`hbjax.parallel`'s).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import PyTree


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Place every array leaf of ``tree`` on every device of ``mesh`` (``P()``).

    Each process passes the same values (e.g. a guide built from the same seed).
    """
    replicated = NamedSharding(mesh, P())

    def place(x: object) -> object:
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = place(jax.random.key_data(x))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        if isinstance(x, jax.Array) and not x.is_fully_addressable:  # already global
            return jax.device_put(x, replicated)
        if isinstance(x, jax.Array | np.ndarray | np.generic):
            return jax.make_array_from_process_local_data(replicated, np.asarray(x))
        return x

    return jax.tree.map(place, tree)


def to_host(tree: PyTree) -> PyTree:
    """Replicated arrays → ordinary single-device arrays (this process's first copy).

    Results then combine freely with other arrays, whatever mesh they were fitted on.
    """

    def local(x: object) -> object:
        if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1:
            if not x.sharding.is_fully_replicated:
                raise ValueError("to_host takes replicated arrays; gather sharded ones first.")
            return x.addressable_data(0)
        return x

    return jax.tree.map(local, tree)


def seed_from_key(key: jax.Array) -> int:
    """The sampling seed :func:`hbjax.fit` derives from its PRNG key (host-side)."""
    data = np.asarray(jax.random.key_data(key)).ravel()
    return int(data[-1]) ^ (int(data[0]) << 32)


__all__ = ["replicate", "seed_from_key", "to_host"]
