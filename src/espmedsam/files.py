"""Atomic file writes: every output goes to a temporary name in its folder, then is renamed into place,
so a failure never leaves a half-written file behind."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[Any], None], *, mode: str = "wb") -> Path:
    """Call ``write(file)`` on a temporary file next to ``path`` (folders created), then rename it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a unique name, so concurrent writers never share a temporary file; opened by us, so the umask applies
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with temp.open(mode) as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda file: file.write(text.encode("utf-8")))
