"""Modes as small modules: one from itself or from its name (imports nothing)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

M = TypeVar("M")


def from_name(value: object, base: type[M], names: Mapping[str, type[M]], what: str) -> M:
    """``value`` if it is a ``base``, else ``names[value]()``; one clear line otherwise."""
    if isinstance(value, base):
        return value
    if isinstance(value, str) and value in names:
        return names[value]()
    raise ValueError(
        f"{what} must be one of {', '.join(names)} or an hbjax {base.__name__}; got {value!r}."
    )
