"""Giving freed host memory back to the operating system between forward passes.

A CPU forward of a large batch allocates hundreds of MB of activations. glibc's allocator keeps those pages
after they are freed, so a long ``predict`` over mixed sizes would hold the largest forward's memory for
good, and fragmentation lets that hold creep upward. ``malloc_trim`` hands the free pages back (about 1 ms).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def release_freed_memory() -> bool:
    """Return the heap's free pages to the OS; False where the C library cannot."""
    trim = _malloc_trim()
    return bool(trim is not None and trim(0) >= 0)
