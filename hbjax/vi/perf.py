"""What a compiled step is made of: for tuning, and for tests that it does not grow with data.

:func:`step_program` lowers one value-and-gradient step of an objective to StableHLO (what
every backend's compiler receives); :func:`program_report` counts what matters for speed
on an accelerator: constants baked into the program (a program that grows with the data
compiles slowly and differently per size), scatters and how many updates each adds onto
how many rows (few targets: atomic-add contention on a GPU), loops (each iteration a
sequence of kernel launches) and conditionals (a GPU copies the predicate to the host and
waits). ``python -m benchmarks.gpu --hlo`` prints it for the benchmark's panels.
"""

from __future__ import annotations

import dataclasses
import math
import re

import equinox as eqx

from .._types import PRNGKeyArray, PyTree
from .guide import AbstractGuide
from .model import AbstractModel
from .objectives import renyi_elbo

_TENSOR = r"tensor<([0-9x]*)(?:[a-z]+[0-9]*)>"
_CONSTANT = re.compile(r"stablehlo\.constant dense<.*?> : " + _TENSOR)
_SCATTER_TYPES = re.compile(
    r"\}\) : \(" + _TENSOR + r", " + _TENSOR + r", " + _TENSOR + r"\) -> " + _TENSOR
)


def _elements(dims: str) -> int:
    """Elements of a ``tensor<AxBx...>`` shape string (``""``: a scalar)."""
    return math.prod(int(d) for d in dims.split("x") if d) if dims else 1


def _rows(dims: str) -> int:
    return int(dims.split("x")[0]) if dims else 1


@dataclasses.dataclass(frozen=True)
class ProgramReport:
    """Counts of what a lowered program holds.

    Attributes:
        constants: number of constants.
        largest_constant: elements of the largest constant (data closed over, not passed
            as an argument, shows up here and grows with the data).
        scatters: ``(update rows, target rows)`` of each scatter.
        loops: ``while`` loops (``lax.scan``/``lax.map``/``fori_loop``).
        conditionals: ``case``/``if`` (``lax.cond``/``lax.switch``).
        collectives: ``all_gather``/``all_reduce``/``reduce_scatter``/``all_to_all``.
    """

    constants: int
    largest_constant: int
    scatters: tuple[tuple[int, int], ...]
    loops: int
    conditionals: int
    collectives: int

    @property
    def worst_scatter_contention(self) -> float:
        """Most update rows per target row of any scatter (0 without scatters)."""
        return max((u / max(t, 1) for u, t in self.scatters), default=0.0)

    def describe(self) -> str:
        """One line for logs."""
        return (
            f"{self.constants} constants (largest {self.largest_constant} elements), "
            f"{len(self.scatters)} scatters (worst {self.worst_scatter_contention:.0f} "
            f"updates per target row), {self.loops} loops, {self.conditionals} conditionals, "
            f"{self.collectives} collectives"
        )


def program_report(text: str) -> ProgramReport:
    """Count constants, scatters, loops, conditionals and collectives in StableHLO text."""
    constants = [_elements(m.group(1)) for m in _CONSTANT.finditer(text)]
    scatters = []
    for start in (m.end() for m in re.finditer(r'"stablehlo\.scatter"', text)):
        types = _SCATTER_TYPES.search(text, start)
        if types is not None:
            scatters.append((_rows(types.group(3)), _rows(types.group(1))))
    return ProgramReport(
        constants=len(constants),
        largest_constant=max(constants, default=0),
        scatters=tuple(scatters),
        loops=len(re.findall(r"stablehlo\.while", text)),
        conditionals=len(re.findall(r"stablehlo\.(?:case|if)\b", text)),
        collectives=len(
            re.findall(r"stablehlo\.(?:all_gather|all_reduce|reduce_scatter|all_to_all)", text)
        ),
    )


def step_program(
    model: AbstractModel,
    guide: AbstractGuide,
    panel: PyTree,
    *,
    key: PRNGKeyArray,
    objective: object = renyi_elbo,
) -> str:
    """StableHLO of one loss-and-gradient evaluation (what :func:`hbjax.fit` steps on).

    The model, guide, data and key are arguments of the program, as in the fit's loop.
    """

    def loss_and_grad(model: AbstractModel, guide: AbstractGuide, panel: PyTree, key: object):  # noqa: ANN202
        return eqx.filter_value_and_grad(lambda g: objective(model, g, panel, key=key))(guide)

    return eqx.filter_jit(loss_and_grad).lower(model, guide, panel, key).as_text()
