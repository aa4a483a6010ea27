"""bf16 autocast against fp32 on the six in-domain test splits: mean Dice per dataset, same weights.

Usage: python benchmarks/bf16_dice.py [--checkpoint CKPT] [--out FILE]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _data import IN_DOMAIN
from _report import report

from espmedsam.checkpoints.native import default_checkpoint, load_model
from espmedsam.data.dataset import parse_dataset_arg
from espmedsam.evaluate import evaluate
from espmedsam.predict import Predictor


def mean_dice(predictor: Predictor, sources) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        summary = evaluate(predictor, sources, split="test", out_dir=out, overlays=0).summary
    return {name: entry["dice"]["mean"] for name, entry in summary["datasets"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint or default_checkpoint())
    sources = [parse_dataset_arg(f"data/{name}") for name in IN_DOMAIN]
    fp32 = mean_dice(Predictor(model, device="cpu", bfloat16=False), sources)
    bf16 = mean_dice(Predictor(model, device="cpu", bfloat16=True), sources)
    lines = ["| dataset | Dice fp32 | Dice bf16 | bf16 − fp32 |", "|---|---:|---:|---:|"]
    for name in fp32:
        lines.append(f"| {name} | {fp32[name]:.4f} | {bf16[name]:.4f} | {bf16[name] - fp32[name]:+.4f} |")
    mean32, mean16 = sum(fp32.values()) / len(fp32), sum(bf16.values()) / len(bf16)
    lines.append(f"| **mean** | {mean32:.4f} | {mean16:.4f} | {mean16 - mean32:+.4f} |")
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
