"""Training throughput of the choices of what trains on a frozen, cached encoder prefix.

Usage: python benchmarks/prefix_throughput.py [CKPT] [--size 256] [--batch 8] [--steps 3] [--threads 2]
       [--out benchmarks/results/prefix_throughput.md]

From the bundled weights grown as the recipe ``six_datasets_controllers`` grows them (controllers from
stage ``first_stage``, a detail branch), one forward and backward of a batch through what follows the
cached prefix, bf16 autocast: the median of ``--steps`` after one warm-up. Rows: controllers in the last
stage (shared weights frozen, the recipe), the last stage and neck trained too, controllers in the last two
stages on a shorter prefix, and the whole encoder frozen (decoder only, the previous recipe). Also the
prefix forward itself, the per-sample cost of building the cache.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _report import cpu_description, median_seconds, report

from espmedsam.checkpoints.native import default_checkpoint, load_model
from espmedsam.train.loop import freeze_prefix, with_layout

GROWN = ("controller.enabled=true", "controller.adapter_ratio=1.0", "detail.enabled=true")


def step_seconds(checkpoint: Path, depth: int, first_stage: int, shared: bool, args) -> float:
    model = with_layout(load_model(checkpoint), (*GROWN, f"controller.first_stage={first_stage}"))
    stages = len(model.image_encoder.layers)
    if depth < stages:
        freeze_prefix(model, depth, shared_suffix=shared)
    else:
        model.image_encoder.requires_grad_(False)
    model.train()
    x = torch.rand(args.batch, 3, args.size, args.size)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        features = model.image_encoder.prefix(x, depth).float()
        embeddings = model.image_encoder.suffix(features, depth).float() if depth == stages else None

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if embeddings is not None:
                out = model.decode(embeddings, "dermoscopy", args.size, x)
            else:
                out = model.forward_from_features(features, depth, x, "dermoscopy")
        out.masks.float().mean().backward()

    return median_seconds(step, args.steps)


def prefix_seconds(checkpoint: Path, depth: int, args) -> float:
    model = load_model(checkpoint)
    x = torch.rand(args.batch, 3, args.size, args.size)

    def forward():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model.image_encoder.prefix(x, depth)

    return median_seconds(forward, args.steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, nargs="?", default=default_checkpoint())
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    choices = [
        ("controllers in stage 3, shared weights frozen (recipe)", 3, 3, False),
        ("stage 3 + neck shared weights and controllers", 3, 3, True),
        ("controllers in stages 2-3, shared weights frozen", 2, 2, False),
        ("whole encoder frozen: refiner, SPPG, QDMD, detail branch", 4, 3, False),
    ]
    lines = [
        f"torch {torch.__version__}, {cpu_description()}, {args.threads} threads, bf16 autocast, "
        f"{args.size}² inputs, batch {args.batch}, median of {args.steps} steps after one warm-up",
        "",
        "| what trains (after the cached prefix) | prefix stages cached | step (s) | training images/s |",
        "|---|---:|---:|---:|",
    ]
    for label, depth, first, shared in choices:
        seconds = step_seconds(args.checkpoint, depth, first, shared, args)
        lines.append(f"| {label} | {depth} | {seconds:.2f} | {args.batch / seconds:.1f} |")
    lines += ["", "| prefix forward (cache build) | stages | images/s |", "|---|---:|---:|"]
    for depth in (2, 3):
        seconds = prefix_seconds(args.checkpoint, depth, args)
        lines.append(f"| stem + stages 0..{depth - 1} | {depth} | {args.batch / seconds:.1f} |")
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
