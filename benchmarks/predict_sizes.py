"""Prediction time per modality at the model's input sizes, and the full forward beside the official layout.

Usage: python benchmarks/predict_sizes.py [--checkpoint CKPT] [--runs 5] [--out FILE]

1. In process, for a 512 x 512 image of each modality: read the file, preprocess, forward (bf16 autocast),
   postprocess, write mask and overlay PNGs (``predict_files``, the path ``espmedsam predict`` takes).
   The bundled examples are timed too, at their own sizes.
2. In the same run, the full forward pass alone in fp32 (batch 1): this model at each modality's size,
   and the official-layout ESP-MedSAM (MobileSAM's stem) at the paper's 1024².
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from _report import median_seconds, report
from PIL import Image

from espmedsam.checkpoints.native import default_checkpoint, load_model
from espmedsam.models.registry import build_model
from espmedsam.predict import EXAMPLES_DIR, Predictor
from espmedsam.predict_files import PredictOptions, predict_files


def predict_seconds(predictor: Predictor, image: Path, modality: str, runs: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        return median_seconds(
            lambda: list(predict_files(predictor, [image], out, PredictOptions(modality=modality))), runs
        )


def forward_seconds(model, modality: str, size: int, runs: int) -> float:
    x = torch.randn(1, 3, size, size)

    def run() -> None:
        with torch.inference_mode():
            model(x, modality)

    return median_seconds(run, runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint or default_checkpoint())
    predictor = Predictor(model, device="cpu")
    rng = np.random.default_rng(0)
    lines = [
        f"{args.threads} threads, median of {args.runs} runs after one warm-up",
        "",
        "| modality | model input | 512² image, read → PNGs written, bf16 (s) | full forward fp32 (s) |",
        "|---|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as folder:
        for modality in model.modalities:
            path = Path(folder) / f"{modality}.png"
            Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(path)
            size = model.input_size(modality)
            seconds = predict_seconds(predictor, path, modality, args.runs)
            forward = forward_seconds(model, modality, size, args.runs)
            lines.append(f"| {modality} | {size}² | {seconds:.3f} | {forward:.3f} |")
    official = build_model("official")
    official_seconds = forward_seconds(official, 0, 1024, args.runs)
    lines.append(f"\nOfficial-layout ESP-MedSAM, full forward fp32 at 1024²: {official_seconds:.3f} s.")
    lines += ["", "Bundled examples (read → PNGs written, bf16):", ""]
    for example in sorted(EXAMPLES_DIR.glob("*.*")):
        if example.suffix.lower() in {".jpg", ".png"}:
            modality = example.name.split("_")[0]
            with Image.open(example) as image:
                shape = f"{image.width}×{image.height}"
            seconds = predict_seconds(predictor, example, modality, args.runs)
            lines.append(f"- {example.name} ({shape}): {seconds:.3f} s")
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
