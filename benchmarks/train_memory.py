"""Memory of ``espmedsam train`` over a shortened run of a recipe, data loaders included.

Usage: python benchmarks/train_memory.py [--config six_datasets_litemedsam] [--init CKPT]
           [--epochs 2] [--steps-per-epoch 100] [--set KEY=VALUE ...] [--out FILE]

The command runs as a child process; every half second the memory of it and of its descendants (data-loader
workers) is summed from /proc: RSS, which counts the pages that a forked worker shares with its parent
once in each, and PSS (``smaps_rollup``), which splits shared pages between the processes that share them,
so the PSS sum is the memory the run takes from the machine. The table gives both when each log record
first appears; the peaks are the highest samples, and the single largest process's peak RSS
(``ru_maxrss``) is given too. Validation and checkpoints are part of the run, as in the recipe.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import report, tree_memory_mb


def last_record(log: Path) -> tuple[int, str]:
    """The step and kind of the last record in a run's log.jsonl ((0, "") before the first)."""
    if not log.is_file():
        return 0, ""
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    try:
        record = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:  # a line being written
        return 0, ""
    return int(record.get("step", 0)), str(record.get("kind", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="six_datasets_litemedsam")
    parser.add_argument("--init", type=Path, default=None)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps-per-epoch", type=int, default=100)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        overrides = [
            f"epochs={args.epochs}",
            f"steps_per_epoch={args.steps_per_epoch}",
            "time_budget_minutes=null",
            f"out_dir={folder}/run",
            *args.overrides,
        ]
        command = [sys.executable, "-m", "espmedsam", "train", "--config", args.config]
        command += [item for override in overrides for item in ("--set", override)]
        command += ["--init", str(args.init)] if args.init else []
        rows, peaks, start = {}, [0.0, 0.0], time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while child.poll() is None:
            rss, pss = tree_memory_mb(child.pid)
            if rss:
                peaks = [max(peaks[0], rss), max(peaks[1], pss)]
                mark = last_record(Path(folder) / "run" / "log.jsonl")
                rows.setdefault(mark, (rss, pss, *peaks, time.perf_counter() - start))
            time.sleep(0.5)
        if child.returncode:
            raise SystemExit(child.stderr.read())
    largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    lines = [
        f"`espmedsam train --config {args.config}` with " + ", ".join([*overrides[:3], *args.overrides]),
        f"peak of the run (process + data-loader workers): PSS {peaks[1]:.0f} MB, RSS {peaks[0]:.0f} MB "
        f"(shared pages counted in each process); largest single process: RSS {largest:.0f} MB",
        "",
        "| log's last record | RSS sum (MB) | PSS sum (MB) | peak RSS sum | peak PSS sum | elapsed (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    marks = list(rows)  # in the order first seen
    shown = [m for i, m in enumerate(marks) if i % max(1, len(marks) // 14) == 0 or m == marks[-1]]
    for step, kind in shown:
        rss, pss, peak_rss, peak_pss, elapsed = rows[(step, kind)]
        label = f"{kind} step {step}" if kind else "none yet (loading)"
        lines.append(f"| {label} | {rss:.0f} | {pss:.0f} | {peak_rss:.0f} | {peak_pss:.0f} | {elapsed:.0f} |")
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
