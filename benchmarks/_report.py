"""Shared parts of the benchmark scripts: a timer, the ending (print, and with --out write to a file), and
reading `espmedsam evaluate` reports."""

from __future__ import annotations

import csv
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


def per_image_scores(folder: Path, metric: str = "dice") -> dict[str, list[tuple[str, float]]]:
    """Dataset -> (image stem, score) of each image of an evaluate report (``per_image.csv``) whose
    ``metric`` is defined."""
    scores: dict[str, list[tuple[str, float]]] = {}
    with (folder / "per_image.csv").open() as handle:
        for row in csv.DictReader(handle):
            if row[metric] not in ("", "nan"):
                scores.setdefault(row["dataset"], []).append((row["stem"], float(row[metric])))
    return scores


def cpu_description() -> str:
    """CPU model and whether it has AMX or AVX-512 bf16 units (they decide bf16 speed)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if "model name" in line), "")
    flags = [f for f in ("amx_bf16", "avx512_bf16") if f in info]
    return f"{model or platform.machine()} ({', '.join(flags) or 'no bf16 matrix units'})"


def tree_memory_mb(root: int) -> tuple[float, float]:
    """(summed RSS, summed PSS) of process ``root`` and all its descendants, in MB (0 once it exited)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    members, frontier = {root}, [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier and pid not in members]
        members.update(children)
        frontier = children
    rss = sum(_field_kb(f"/proc/{pid}/status", "VmRSS:") for pid in members)
    pss = sum(_field_kb(f"/proc/{pid}/smaps_rollup", "Pss:") for pid in members)
    return rss / 1024, pss / 1024


def _field_kb(path: str, name: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(name):
                return int(line.split()[1])
    except OSError:
        pass
    return 0
