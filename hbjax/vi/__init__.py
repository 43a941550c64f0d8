"""The core a researcher extends, knowing nothing of tables, counts or files.

:mod:`~hbjax.vi.model` (model bases: capabilities as abstract methods),
:mod:`~hbjax.vi.layers`, :mod:`~hbjax.vi.guide`, :mod:`~hbjax.vi.objectives`,
:mod:`~hbjax.vi.step` (SVI init/step), :mod:`~hbjax.vi.loop`, :mod:`~hbjax.vi.convergence`,
:mod:`~hbjax.vi.checkpoint`, :mod:`~hbjax.vi.diagnostics` (PSIS, k-hat),
:mod:`~hbjax.vi.checks` (per-unit checks against importance sampling and NUTS),
:mod:`~hbjax.vi.fit`, :mod:`~hbjax.vi.host` (the data interfaces a fit reads),
:mod:`~hbjax.vi.devices`, :mod:`~hbjax.vi.compilation` and :mod:`~hbjax.vi.perf`.
Each submodule is imported on first use.
"""

from .._lazy import lazy_module

__getattr__, __dir__ = lazy_module(
    __name__,
    {},
    (
        "checkpoint", "checks", "compilation", "convergence", "devices", "diagnostics", "fit",
        "guide", "host", "layers", "loop", "model", "objectives", "perf", "step",
    ),
)  # fmt: skip
