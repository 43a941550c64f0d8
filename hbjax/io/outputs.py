"""Outputs written whole or not at all: result folders and files.

A failed or interrupted run (a full disk, Ctrl-C, a bad row found late) leaves the previous
result untouched and no half-written one: :class:`AtomicFolder` writes into a temporary
sibling folder and renames it into place once complete; :func:`write_file_atomically` does
the same for one file. Both check that the destination can be written *before* the long
work starts.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path


class OutputError(ValueError):
    """An output destination that cannot be used; the message names it and the fix."""


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


class AtomicFolder:
    """A result folder replaced as a whole: write into :attr:`staging`, then :meth:`commit`.

    Used as a context manager, it commits on success and discards the staging folder on
    any exception (the previous folder stays as it was).

    Args:
        path: the result folder.
        owns: names of files that mark a folder as one of these results (e.g.
            ``fit.json``): an existing non-empty folder with none of them holds something
            else and is refused rather than replaced.
        known: if given, every name such a folder may hold; one holding anything else (a
            file of yours saved beside the results) is refused too. Hidden names are
            ignored.
        what: the option or argument that named the folder, for messages (``--out``).

    Raises:
        OutputError: ``path`` is empty, a file, a folder holding other things, or its
            parent cannot be written.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        owns: Iterable[str],
        known: Iterable[str] | None = None,
        what: str = "--out",
    ):
        if str(path).strip() == "":
            raise OutputError(f"{what} is empty; name the folder to write the results to.")
        self.path = Path(path)
        self.what = what
        resolved, here = self.path.resolve(), Path.cwd().resolve()
        if os.path.ismount(resolved) or resolved == here or resolved in here.parents:
            where = "a mount point" if os.path.ismount(resolved) else "this folder or one above it"
            raise OutputError(
                f"{what} {str(path)!r} is {where}, which cannot be replaced as a whole; name a "
                f"folder inside it (e.g. {what} {Path(path) / 'results'})."
            )
        if self.path.exists():
            if not self.path.is_dir():
                raise OutputError(f"{what} {str(path)!r} exists and is not a folder.")
            entries = {e.name for e in self.path.iterdir() if not e.name.startswith(".")}
            foreign = entries - set(known) if known is not None else set()
            if (entries and not entries & set(owns)) or foreign:
                names = sorted(foreign or entries)
                raise OutputError(
                    f"{what} {str(path)!r} holds other files ({', '.join(names[:3])}"
                    f"{', ...' if len(names) > 3 else ''}); name a new or empty folder, so "
                    "that nothing of yours is replaced."
                )
        parent = self.path.absolute().parent
        self.staging = parent / f".{self.path.name}.partial-{uuid.uuid4().hex[:12]}"
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.staging.mkdir()  # checks now that the results can be written
        except OSError as exc:
            raise OutputError(
                f"cannot write {what} {str(path)!r}: {_reason(exc)} (in {str(parent)!r})."
            ) from None

    def commit(self) -> None:
        """Put the staging folder in place of :attr:`path` (the old one is then removed)."""
        old = None
        if self.path.exists():
            old = self.staging.with_name(self.staging.name.replace(".partial-", ".old-"))
            os.rename(self.path, old)
        os.rename(self.staging, self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        """Remove the staging folder; :attr:`path` is left as it was."""
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> Path:
        return self.staging

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()


def is_within(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (links resolved)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def check_file_destination(
    path: str | os.PathLike[str],
    *,
    what: str = "--out",
    inputs: Iterable[str | os.PathLike[str]] = (),
) -> Path:
    """``path`` as a file destination: its folder exists and is writable, it is no folder.

    ``inputs``: files and folders the command reads, which ``path`` must not replace (or
    lie in).
    """
    path = Path(path)
    if str(path).strip() == "" or path.is_dir():
        raise OutputError(f"{what} {str(path)!r} is a folder or empty; name a file to write.")
    for source in inputs:
        if is_within(path, source):
            raise OutputError(
                f"{what} {str(path)!r} would overwrite {str(source)!r}, which this command "
                "reads; name another file."
            )
    folder = path.absolute().parent
    if not folder.is_dir():
        raise OutputError(f"{what}: folder {str(folder)!r} does not exist.")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"{what}: cannot write in {str(folder)!r} (permission denied).")
    return path


def write_file_atomically(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """``write(temporary)`` next to ``path``, then rename: never a half-written ``path``.

    Raises:
        OutputError: the file could not be written (full disk, permissions); ``path`` is
            left as it was.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:12]}")
    try:
        write(temporary)
        os.replace(temporary, path)
    except OSError as exc:
        raise OutputError(f"cannot write {str(path)!r}: {_reason(exc)}.") from None
    finally:
        temporary.unlink(missing_ok=True)


__all__ = [
    "AtomicFolder",
    "OutputError",
    "check_file_destination",
    "is_within",
    "write_file_atomically",
]
