from __future__ import annotations

import ctypes.util

import pytest

from espmedsam.memory import release_freed_memory


def _rss_kb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


@pytest.mark.skipif(ctypes.util.find_library("c") is None, reason="no C library to load")
def test_freed_heap_pages_go_back_to_the_os():
    if not release_freed_memory():
        pytest.skip("this C library has no malloc_trim")
    # many small blocks live on the heap (large ones are mmap-ed and given back by free itself)
    blocks = [bytearray(4096) for _ in range(50_000)]
    pin = [bytearray(4096) for _ in range(10)]  # live blocks above them keep free() from trimming
    held = _rss_kb()
    del blocks
    assert _rss_kb() > held - 100_000  # freed, but still resident
    assert release_freed_memory() and pin
    assert _rss_kb() < held - 100_000  # most of the ~200 MB is back
