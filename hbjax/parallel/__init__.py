"""The parallel part: meshes, block plans, placement and the kernels that use them.

:mod:`hbjax.parallel.blocks` (meshes, block plans, ordered sums) and
:mod:`hbjax.parallel.rows` (any model's data as rows of whole units: sharded and
minibatched). Imports JAX, Equinox and NumPy only.
"""
