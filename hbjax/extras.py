"""Optional libraries, imported only when a user asks for them.

The core (``import hbjax``, every fit, the CLI) needs none of these. A library that is
missing or broken (e.g. distrax whose tensorflow-probability does not match the installed
JAX) is reported in one line naming the installed versions and the fix.
"""

from __future__ import annotations

import importlib
import types
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

#: The distributions of the packages an optional import depends on, named in its error.
_RELATED = {
    "distrax": ("distrax", "tensorflow-probability", "tfp-nightly", "jax", "jaxlib"),
    "arviz": ("arviz", "xarray"),
    "blackjax": ("blackjax", "jax", "jaxlib"),
    "matplotlib": ("matplotlib",),
}


def installed_versions(*distributions: str) -> str:
    """``"name version, ..."`` of those of ``distributions`` that are installed."""
    found = []
    for name in distributions:
        try:
            found.append(f"{name} {_version(name)}")
        except PackageNotFoundError:
            continue
    return ", ".join(found) if found else "none of them installed"


def optional_import(module: str, *, purpose: str) -> types.ModuleType:
    """Import an optional library, or raise one clear ``ImportError`` line.

    Args:
        module: ``"distrax"``, ``"arviz"``, ``"blackjax"`` or ``"matplotlib"`` (the extra of
            the same name).
        purpose: what needs it, for the message (e.g. ``"to_arviz"``).

    Raises:
        ImportError: the library is missing or fails to import; the message names the
            installed versions of it and of what it depends on, and the extra to install.
    """
    try:
        return importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - a broken dependency chain raises anything
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        related = installed_versions(*_RELATED.get(module, (module,)))
        raise ImportError(
            f"{purpose} needs {module}, which cannot be imported ({type(exc).__name__}: "
            f"{first[:200]}; installed: {related}); install a matching set with "
            f'pip install -U "hbjax[{module}]". hbjax itself does not '
            f"need {module}."
        ) from None


def distrax() -> types.ModuleType:
    """The ``distrax`` module, for guides or models a user builds from its distributions.

    Needs ``pip install "hbjax[distrax]"`` (distrax pulls in tensorflow-probability, whose
    builds follow JAX's releases closely; hbjax's own code never imports either).
    """
    return optional_import("distrax", purpose="this code")
