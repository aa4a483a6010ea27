"""End-to-end prediction time of one image: read -> preprocess -> model -> postprocess -> PNGs written.

Usage: python benchmarks/predict_latency.py [IMAGE] [--modality xray] [--checkpoint CKPT] [--runs 5]

Times the in-process path of ``espmedsam predict`` for one image (model already loaded), and the whole
command in a fresh process (Python start, imports and model loading included).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from espmedsam.checkpoints.native import default_checkpoint, load_model
from espmedsam.models.registry import build_model
from espmedsam.predict import EXAMPLES_DIR, Predictor
from espmedsam.predict_files import PredictOptions, predict_files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", type=Path, nargs="?", default=EXAMPLES_DIR / "xray_chncxr_0002_0.jpg")
    parser.add_argument("--modality", default="xray")
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkpoint = args.checkpoint or default_checkpoint()
    model = load_model(checkpoint) if checkpoint else build_model()
    predictor = Predictor(model)
    with tempfile.TemporaryDirectory() as out:
        times = []
        for _ in range(args.runs + 1):
            start = time.perf_counter()
            list(predict_files(predictor, [args.image], out, PredictOptions(modality=args.modality)))
            times.append(time.perf_counter() - start)
        command = [sys.executable, "-m", "espmedsam", "predict", str(args.image), "-m", args.modality]
        command += ["--out", out]
        if checkpoint:
            command += ["--checkpoint", str(checkpoint)]
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        whole = time.perf_counter() - start
    print(
        f"{args.image.name} ({args.image.stat().st_size // 1024} KiB), "
        f"model input {predictor.input_size(args.modality)}², "
        f"{args.threads} threads: {statistics.median(times[1:]):.3f} s per image in process "
        f"(median of {args.runs}); whole `espmedsam predict` command {whole:.2f} s"
    )


if __name__ == "__main__":
    main()
