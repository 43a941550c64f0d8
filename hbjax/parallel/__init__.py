"""The parallel part: meshes, block plans, layouts, rows of whole units and many hosts.

:mod:`~hbjax.parallel.blocks` (meshes, block plans, ordered sums),
:mod:`~hbjax.parallel.layouts`, :mod:`~hbjax.parallel.rows` (any model's data as rows of
whole units: sharded and minibatched) and :mod:`~hbjax.parallel.hosts` (``jax.distributed``).
Imports JAX, Equinox and NumPy only. Each submodule is imported on first use.
"""

from .._lazy import lazy_module

__getattr__, __dir__ = lazy_module(__name__, {}, ("blocks", "hosts", "layouts", "rows"))
