"""Throughput of frozen-encoder training (recipe six_datasets_litemedsam): the one-off embedding of each
training input, and the SPPG + QDMD training step on cached embeddings, each in bf16 and fp32.

Usage: python benchmarks/frozen_throughput.py [--checkpoint CKPT] [--batch 16] [--steps 4] [--out FILE]

Per modality at the model's input size: seconds per embedded image (controller-free encoder, no_grad,
batch 4) and images/s of one optimiser step (forward, loss, backward, AdamW) on random embeddings of
that size. The recipe samples the eight training sets equally, so its step rate is the harmonic mean
over the sets' modalities, also printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _report import median_seconds, report

from espmedsam.checkpoints.native import default_checkpoint, load_model
from espmedsam.losses import SegmentationLoss

# modality of each of the recipe's eight training sets
RECIPE_SETS = (
    "dermoscopy",
    "xray",
    "ultrasound",
    "ultrasound",
    "fundus",
    "microscopy",
    "microscopy",
    "colonoscopy",
)


def embed_seconds(model, size: int, bf16: bool, repeats: int) -> float:
    images = torch.randn(4, 3, size, size)

    def run() -> None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model.encode(images, None)

    return median_seconds(run, repeats) / 4


def step_images_per_second(model, modality: str, size: int, batch: int, bf16: bool, repeats: int) -> float:
    model.train()
    model.image_encoder.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    loss_fn = SegmentationLoss()
    grid = size // model.config.encoder.output_stride
    embeddings = torch.randn(batch, model.config.encoder.out_chans, grid, grid)
    masks = (torch.rand(batch, 1, size, size) > 0.7).float()

    def run() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model.decode(embeddings, modality, size)
        loss = loss_fn(out.masks, masks, out.patch_logits).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return batch / median_seconds(run, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint or default_checkpoint())
    lines = [
        f"{args.threads} threads, batch {args.batch} for training steps, median of {args.steps}",
        "",
        "| modality | input | embed bf16 (s/image) | embed fp32 (s/image) | step bf16 (images/s) "
        "| step fp32 (images/s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    rates: dict[str, dict[bool, float]] = {}
    for modality in model.modalities:
        size = model.input_size(modality)
        embed = {bf16: embed_seconds(model, size, bf16, 2) for bf16 in (True, False)}
        rates[modality] = {
            bf16: step_images_per_second(model, modality, size, args.batch, bf16, args.steps)
            for bf16 in (True, False)
        }
        lines.append(
            f"| {modality} | {size}² | {embed[True]:.3f} | {embed[False]:.3f} | "
            f"{rates[modality][True]:.1f} | {rates[modality][False]:.1f} |"
        )
    for bf16, label in ((True, "bf16"), (False, "fp32")):
        mean = len(RECIPE_SETS) / sum(1 / rates[m][bf16] for m in RECIPE_SETS)
        lines.append(
            f"\nRecipe mix (eight sets sampled equally), {label}: {mean:.1f} images/s per training step."
        )
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
