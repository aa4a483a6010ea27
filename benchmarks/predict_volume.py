"""Time to segment a 100-slice 512² NIfTI volume end to end (read, window, segment slice by slice, write
the NIfTI mask and the montage), for each modality's input size.

Usage: python benchmarks/predict_volume.py [--checkpoint CKPT] [--openvino MODEL.onnx] [--modalities xray]
       [--slices 100] [--side 512] [--out FILE]

Torch (bf16 autocast) always; with ``--openvino`` also the exported file in OpenVINO (compiled graphs
cached, as ``predict`` keeps them, and compiled once before timing).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _report import cpu_description, report

from espmedsam.checkpoints.native import default_checkpoint, load_model
from espmedsam.predict import Predictor
from espmedsam.predict_files import PredictOptions, predict_files


def synthetic_volume(path: Path, slices: int, side: int) -> Path:
    """A smooth random volume (int16, CT-like values) with a bright ellipsoid, 0.7 x 0.7 x 2.5 mm voxels."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    z, y, x = np.ogrid[:slices, :side, :side]
    ball = (
        ((x - side / 2) / (side / 4)) ** 2
        + ((y - side / 2) / (side / 5)) ** 2
        + ((z - slices / 2) / (slices / 3)) ** 2
    )
    volume = (rng.normal(0, 30, (slices, side, side)) + 400 * (ball < 1) - 200).astype(np.int16)
    nib.save(nib.Nifti1Image(volume.transpose(2, 1, 0), np.diag([0.7, 0.7, 2.5, 1.0])), path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--openvino", type=Path, default=None, help="An exported .onnx file for OpenVINO.")
    parser.add_argument("--modalities", nargs="*", default=None, help="Default: auto and all six.")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    predictors = {"torch bf16": Predictor(load_model(args.checkpoint or default_checkpoint()), device="cpu")}
    if args.openvino:
        from espmedsam.openvino_backend import CACHE_DIR, OpenVinoBackend

        backend = OpenVinoBackend(args.openvino, threads=args.threads, cache_dir=CACHE_DIR)
        predictors[f"openvino {backend.precision}"] = Predictor(backend)
    batch = predictors["torch bf16"].batch_size
    lines = [
        f"{args.slices} slices of {args.side}², int16 NIfTI, {cpu_description()}, {args.threads} threads, "
        f"batch {batch}; "
        "read → segment → NIfTI mask + montage",
        "",
        "| backend | --modality | model input | seconds | slices/s |",
        "|---|---|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as folder:
        path = synthetic_volume(Path(folder) / "volume.nii.gz", args.slices, args.side)
        for name, predictor in predictors.items():
            for modality in args.modalities or ("auto", *predictor.modalities):
                options = PredictOptions(modality=modality)
                if name.startswith("openvino"):  # compile (or load from the cache) before timing
                    predict_files(predictor, [path], Path(folder) / "warm", options)
                start = time.perf_counter()
                [result] = predict_files(predictor, [path], Path(folder) / "out", options)
                seconds = time.perf_counter() - start
                if not result.ok:
                    raise SystemExit(result.error)
                label = f"auto → {result.modality}" if modality == "auto" else modality
                size = predictor.input_size(result.modality)
                lines.append(f"| {name} | {label} | {size}² | {seconds:.1f} | {args.slices / seconds:.1f} |")
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
