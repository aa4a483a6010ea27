"""Training throughput (images/s) of one optimisation step: forward, loss, backward, AdamW.

Usage: python benchmarks/train_throughput.py [--size 256] [--batch 8] [--steps 6] [--out FILE]

Random images and masks of a mixed-modality batch; the data pipeline is not included (it runs in the
same process during training and costs a few percent at 256²).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _report import report

from espmedsam import build_model
from espmedsam.losses import SegmentationLoss


def images_per_second(size: int, batch: int, steps: int, bf16: bool) -> float:
    model = build_model("default").train()
    loss_fn = SegmentationLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, size, size)
    masks = (torch.rand(batch, 1, size, size) > 0.7).float()
    modality = torch.arange(batch) % 6
    times = []
    for _ in range(steps + 2):  # two warm-up steps
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(images, modality)
        parts = loss_fn(out.masks, masks, out.patch_logits)
        optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bf16 = images_per_second(args.size, args.batch, args.steps, True)
    fp32 = images_per_second(args.size, args.batch, args.steps, False)
    text = (
        f"Training step at {args.size}², batch {args.batch} (mixed modalities), {args.threads} threads, "
        f"median of {args.steps} steps: bf16 autocast {bf16:.1f} images/s, fp32 {fp32:.1f} images/s."
    )
    report(text, args.out)


if __name__ == "__main__":
    main()
