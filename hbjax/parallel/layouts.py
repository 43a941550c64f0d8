"""Layouts: how a panel's rows are laid out on a mesh, as small modules checked when built.

A layout is chosen once, before placement (:func:`hbjax.counts.fit_counts`):

* :class:`Rows`: the rows themselves, each block padded to its longest; any likelihood.
* :class:`Dense`: a [unit slot, period] grid with a mask and sufficient statistics, the
  fastest for mostly complete panels (Poisson, unclipped).
* :class:`Auto` (the default): :class:`Dense` when at least ``min_fill`` of the
  unit x period cells are observed, else :class:`Rows`.

The names ``"rows"``, ``"dense"`` and ``"auto"`` stand for the modules with their defaults
(:func:`as_layout`).
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx

from .blocks import ShardingError

#: :class:`Auto` picks the dense layout for panels at least this full (observed / cells).
DENSE_MIN_FILL = 0.5


def _check_cell_chunk(cell_chunk: int | None) -> None:
    if cell_chunk is None:
        return
    if isinstance(cell_chunk, bool) or not isinstance(cell_chunk, int) or cell_chunk < 1:
        raise ShardingError(f"cell_chunk must be a positive int; got {cell_chunk!r}.")


class AbstractLayout(eqx.Module):
    """How rows are placed on a mesh; ``name`` is what strings and saved settings call it."""

    name: eqx.AbstractClassVar[str]


class Rows(AbstractLayout):
    """The rows, in equal blocks of whole units padded with zero-weight rows."""

    name: ClassVar[str] = "rows"


class Dense(AbstractLayout):
    """A [unit slot, period] grid with a mask and per-unit sufficient statistics.

    Attributes:
        cell_chunk: slots summed together before the per-cell scatter
            (:func:`hbjax.parallel.blocks.slot_plan`); ``None``: the backend's default
            (:func:`hbjax.parallel.blocks.default_cell_chunk`: 1 on CPU, none needed).
    """

    name: ClassVar[str] = "dense"
    cell_chunk: int | None = eqx.field(static=True, default=None)

    def __check_init__(self) -> None:
        _check_cell_chunk(self.cell_chunk)


class Auto(AbstractLayout):
    """:class:`Dense` for panels at least ``min_fill`` full, else :class:`Rows`.

    Attributes:
        min_fill: the least share of observed unit x period cells for the dense layout.
        cell_chunk: the dense layout's (see :class:`Dense`).
    """

    name: ClassVar[str] = "auto"
    min_fill: float = eqx.field(static=True, default=DENSE_MIN_FILL, converter=float)
    cell_chunk: int | None = eqx.field(static=True, default=None)

    def __check_init__(self) -> None:
        if not 0.0 <= self.min_fill <= 1.0:
            raise ShardingError(f"min_fill must be from 0 to 1; got {self.min_fill}.")
        _check_cell_chunk(self.cell_chunk)

    def choose(self, fill: float) -> Dense | Rows:
        """The layout for a panel of which ``fill`` of the unit x period cells are observed."""
        return Dense(self.cell_chunk) if fill >= self.min_fill else Rows()


#: The layouts by name (``layout="rows"`` and so on).
LAYOUTS: dict[str, type[AbstractLayout]] = {"auto": Auto, "dense": Dense, "rows": Rows}


def as_layout(layout: str | AbstractLayout, cell_chunk: int | None = None) -> AbstractLayout:
    """A layout from itself or its name; ``cell_chunk`` goes to a named dense or auto layout."""
    if isinstance(layout, AbstractLayout):
        if cell_chunk is not None:
            raise ShardingError(
                f"cell_chunk goes into the layout itself (Dense(cell_chunk={cell_chunk})), "
                f"not next to {layout!r}."
            )
        return layout
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ShardingError(
            f"layout must be one of {', '.join(LAYOUTS)} or an hbjax.parallel.layouts."
            f"AbstractLayout; got {layout!r}."
        )
    if layout == "rows":
        if cell_chunk is not None:
            raise ShardingError("cell_chunk is for the dense layout; the rows layout has none.")
        return Rows()
    return LAYOUTS[layout](cell_chunk=cell_chunk)


__all__ = ["DENSE_MIN_FILL", "LAYOUTS", "AbstractLayout", "Auto", "Dense", "Rows", "as_layout"]
