"""Shared parts of the benchmark scripts: a timer, and the ending (print, and with --out write to a file)."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``run`` after one warm-up call."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def report(text: str, out: Path | None) -> None:
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def cpu_description() -> str:
    """CPU model and whether it has AMX or AVX-512 bf16 units (they decide bf16 speed)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if "model name" in line), "")
    flags = [f for f in ("amx_bf16", "avx512_bf16") if f in info]
    return f"{model or platform.machine()} ({', '.join(flags) or 'no bf16 matrix units'})"
