"""Training throughput (images/s) on one process vs N processes (DDP, gloo, CPU), on the real data.

Usage: python benchmarks/ddp_throughput.py [--processes 2] [--cores 2] [--size 256] [--batch 8]
       [--steps 20] [--warmup 3] [--out FILE]

Both runs go through the real entry points, ``espmedsam train`` and
``torchrun --standalone --nproc_per_node=N -m espmedsam train``: the default model on the six in-domain
datasets (``data/<name>``) at ``--size``, global batch ``--batch``, bf16 autocast, augmentation on, no
validation, and ``--cores / N`` torch threads per process (OMP_NUM_THREADS). Throughput is the images of
the ``--steps`` steps after ``--warmup`` over their wall time, from each run's ``log.jsonl`` (one record
per step; the final checkpoint is written after the last timed step).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _data import IN_DOMAIN
from _report import report

from espmedsam.data.dataset import KNOWN_DATASETS

ROOT = Path(__file__).resolve().parents[1]


def run(processes: int, threads: int, args: argparse.Namespace, out_dir: Path, **extra: str) -> float:
    """Images/s of the timed steps of one training run on ``processes`` processes."""
    data = [f"{ROOT / 'data' / name}:{KNOWN_DATASETS[name]}" for name in IN_DOMAIN]
    steps = args.warmup + args.steps
    overrides = {
        "data": json.dumps(data), "model": "default", "image_size": args.size, "batch_size": args.batch,
        "epochs": 1, "steps_per_epoch": steps, "warmup_steps": 1, "val_split": "null", "bf16": "true",
        "log_every": 1, "checkpoint_every": 10**6, "out_dir": out_dir, **extra,
    }  # fmt: skip
    sets = [part for key, value in overrides.items() for part in ("--set", f"{key}={value}")]
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [*launcher, "-m", "espmedsam", "train", *sets]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"{' '.join(command[:6])} ... failed:\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    elapsed = {r["step"]: r["elapsed_s"] for r in records if r["kind"] == "train"}
    return args.steps * args.batch / (elapsed[steps] - elapsed[args.warmup])


def commit() -> str:
    """The short commit hash, marked when the working tree has changes."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=ROOT)
    return head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    threads = max(1, args.cores // args.processes)
    with tempfile.TemporaryDirectory() as folder:
        one = run(1, args.cores, args, Path(folder) / "one")
        narrow = run(1, threads, args, Path(folder) / "narrow")
        many = run(args.processes, threads, args, Path(folder) / "many")
        unsynced = run(args.processes, threads, args, Path(folder) / "unsynced", sync_batchnorm="false")
    text = (
        f"Training throughput, default model at {args.size}², global batch {args.batch}, bf16 autocast, "
        f"the six in-domain datasets, {args.steps} steps after {args.warmup} warm-up steps, "
        f"{args.cores} cores; commit {commit()}\n\n"
        "| processes (gloo, CPU) | torch threads each | images/s | vs 1 process on all cores "
        "| vs 1 process on one process's cores |\n|---|---:|---:|---:|---:|\n"
        f"| 1 | {args.cores} | {one:.2f} | 1.00× | |\n"
        f"| 1 | {threads} | {narrow:.2f} | {narrow / one:.2f}× | 1.00× |\n"
        f"| {args.processes} | {threads} | {many:.2f} | {many / one:.2f}× | {many / narrow:.2f}× |\n"
        f"| {args.processes}, sync_batchnorm=false | {threads} | {unsynced:.2f} | {unsynced / one:.2f}× "
        f"| {unsynced / narrow:.2f}× |\n\n"
        f"Scaling efficiency of {args.processes} processes: {100 * many / (args.processes * narrow):.0f} % "
        f"of {args.processes} × the one-process rate ({100 * unsynced / (args.processes * narrow):.0f} % "
        "with per-process batch norm)."
    )
    report(text, args.out)


if __name__ == "__main__":
    main()
