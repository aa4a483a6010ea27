"""Atomic file writes: every output goes to a temporary name in its folder, then is renamed into place,
so a failure never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from espmedsam.errors import OutputError

TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")  # the names atomic_write gives its temporaries


def atomic_write(path: str | Path, write: Callable[[Any], None], *, mode: str = "wb") -> Path:
    """Call ``write(file)`` on a temporary file next to ``path`` (folders created), then rename it.

    Raises:
        OutputError: the folder cannot be made, ``path`` is a folder, or writing fails (disk full, no
            permission, a read-only file system), in one line naming the file; nothing is left behind.
    """
    path = Path(path)
    make_folder(path.parent)
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder")
    # a unique name, so concurrent writers never share a temporary file; opened by us, so the umask applies
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")
    try:
        with temp.open(mode) as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):  # on a full or read-only disk even this may fail
            temp.unlink(missing_ok=True)
        if isinstance(error, OSError) and not isinstance(error, OutputError):
            raise _output_error(f"cannot write {path}", error) from error
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda file: file.write(text.encode("utf-8")))


def make_folder(folder: str | Path) -> Path:
    """Create ``folder`` and its parents if needed.

    Raises:
        OutputError: it cannot be made (a file is in the way, no permission, a read-only file system).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        blocker = _file_in_the_way(folder)
        if blocker is not None:
            raise OutputError(f"cannot create folder {folder}: {blocker} is a file") from None
        raise _output_error(f"cannot create folder {folder}", error) from None
    return folder


def check_output_folder(folder: str | Path, option: str = "--out") -> Path:
    """Fail early, before any work, if ``folder`` could not be an output folder; creates nothing.

    Raises:
        OutputError: it, or a parent, is a file, or the nearest existing parent is not writable.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{option} {folder}: not a folder (a file of that name exists)")
    _check_creatable(folder, option)
    return folder


def check_output_file(path: str | Path, option: str = "--out") -> Path:
    """Fail early, before any work, if ``path`` could not be written; creates nothing.

    Raises:
        OutputError: it is a folder, a parent is a file, or its folder is not writable.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{option} {path}: is a folder, not a file")
    _check_creatable(path.parent, option)
    return path


def _check_creatable(folder: Path, option: str) -> None:
    blocker = _file_in_the_way(folder)
    if blocker is not None:
        raise OutputError(f"{option} {folder}: cannot be created, {blocker} is a file")
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {folder}: cannot write in {existing} (Permission denied)")


def _file_in_the_way(folder: Path) -> Path | None:
    """The first of ``folder`` and its parents that exists as something other than a folder."""
    return next((p for p in reversed((folder, *folder.parents)) if p.exists() and not p.is_dir()), None)


def _output_error(what: str, cause: OSError) -> OutputError:
    """``what: <reason>`` as an OutputError that keeps the cause's errno."""
    error = OutputError(f"{what}: {cause.strerror or cause}")
    error.errno = cause.errno  # not strerror: with both set, str() would be "[Errno N] ..." alone
    return error


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that a killed writer left in ``folder``; return what was deleted.

    Only call this where no other process is writing into ``folder`` (such as a run folder being resumed).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if _TEMP_NAME.match(p.name) and p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
