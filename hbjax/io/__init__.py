"""Tables in and files out: reading and checking tables and labels, outputs written whole.

:mod:`~hbjax.io.tables` (CSV and Parquet read as written, the checks of values and labels,
labels saved with their types) and :mod:`~hbjax.io.outputs` (folders and files replaced
whole or not at all). Each submodule is imported on first use.
"""

from .._lazy import lazy_module

__getattr__, __dir__ = lazy_module(__name__, {}, ("outputs", "tables"))
