"""End-to-end ``espmedsam predict`` throughput over the six in-domain test splits, per backend.

Usage: python benchmarks/predict_throughput.py [--checkpoint CKPT] [--onnx MODEL.onnx] [--openvino]
       [--native-openvino] [--backends NAME ...] [--limit N] [--out FILE]

Each backend runs ``predict_files`` (what ``espmedsam predict`` runs: read ahead, classify the modality,
segment in batches, write mask and overlay PNGs and predictions.csv) over the same files with
``--modality auto``: torch fp32, torch bf16 autocast and, with ``--onnx``, onnxruntime and (``--openvino``)
OpenVINO, its graphs compiled before timing (as a second run finds them in its cache); with
``--native-openvino`` the native checkpoint with its encoder graph in OpenVINO ("openvino native",
``predict --backend openvino`` on a ``.safetensors``: quality scores included, as torch's); ``--backends``
keeps only the named ones. In the same run,
the official-layout ESP-MedSAM (MobileSAM's stem, one shared controller) forward in fp32 at 1024², batch 1.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _data import IN_DOMAIN, split_images
from _report import cpu_description, median_seconds, report

from espmedsam.checkpoints.native import default_checkpoint, load_model
from espmedsam.models.registry import build_model
from espmedsam.predict import Predictor
from espmedsam.predict_files import predict_files


def run(predictor: Predictor, files: list[tuple[Path, str]]) -> tuple[float, float]:
    """(images/s, share of files whose chosen modality is their dataset's)."""
    truth = {path: modality for path, modality in files}
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        results = list(predict_files(predictor, list(truth), out))
        seconds = time.perf_counter() - start
    failed = [r.error for r in results if not r.ok]
    if failed:
        raise SystemExit(f"{len(failed)} files failed, e.g. {failed[0]}")
    right = sum(r.modality == truth[r.source] for r in results)
    return len(results) / seconds, right / len(results)


def official_forward_seconds(runs: int) -> float:
    model = build_model("official")
    x = torch.randn(1, 3, 1024, 1024)

    def forward() -> None:
        with torch.inference_mode():
            model(x, 0)

    return median_seconds(forward, runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--onnx", type=Path, default=None)
    parser.add_argument("--openvino", action="store_true", help="Also run the --onnx file in OpenVINO.")
    parser.add_argument("--native-openvino", action="store_true", help="Also the native file in OpenVINO.")
    parser.add_argument(
        "--max-graphs", type=int, nargs="*", default=[0],
        help="The native file in OpenVINO with at most N compiled sides kept (0: all), one row each.",
    )  # fmt: skip
    parser.add_argument("--backends", nargs="*", default=None, help="Only these, e.g. 'torch bf16'.")
    parser.add_argument("--limit", type=int, default=None, help="At most N images per dataset.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    files = [f for name in IN_DOMAIN for f in split_images((name,), "test")[: args.limit]]
    model = load_model(args.checkpoint or default_checkpoint())
    backends = {
        "torch fp32": Predictor(model, device="cpu", bfloat16=False),
        "torch bf16": Predictor(model, device="cpu", bfloat16=True),
    }
    if args.onnx:
        from espmedsam.onnx_backend import OnnxBackend

        backends["onnxruntime fp32"] = Predictor(OnnxBackend(args.onnx, threads=args.threads))
    if args.onnx and args.openvino:
        from espmedsam.openvino_backend import CACHE_DIR, OpenVinoBackend

        backend = OpenVinoBackend(args.onnx, threads=args.threads, cache_dir=CACHE_DIR)
        backends[f"openvino {backend.precision}"] = predictor = Predictor(backend)
        run(predictor, [next(f for f in files if f[1] == m) for m in {m for _, m in files}])  # compile
    if args.native_openvino:
        import copy

        from espmedsam.openvino_encoder import use_openvino_encoder

        for limit in args.max_graphs:
            copied = copy.deepcopy(model)
            hybrid = use_openvino_encoder(copied, threads=args.threads, max_graphs=limit or None)
            name = "openvino native" + (f", {limit} side{'s' * (limit > 1)} kept" if limit else "")
            backends[name] = predictor = Predictor(hybrid, device="cpu")
            run(predictor, [next(f for f in files if f[1] == m) for m in {m for _, m in files}])  # compile
    backends = {name: p for name, p in backends.items() if not args.backends or name in args.backends}
    official = official_forward_seconds(3)
    lines = [
        f"{len(files)} test images of {len(IN_DOMAIN)} datasets, {cpu_description()}, "
        f"{args.threads} threads, --modality auto, "
        "read → classify → segment → mask + overlay PNGs + predictions.csv",
        f"official layout, fp32 forward at 1024², batch 1: {official:.3f} s = {1 / official:.2f} images/s",
        "",
        "| backend | images/s | × official-layout fp32 1024² forward | modality chosen right |",
        "|---|---:|---:|---:|",
    ]
    for name, predictor in backends.items():
        rate, right = run(predictor, files)
        lines.append(f"| {name} | {rate:.2f} | {rate * official:.1f}× | {100 * right:.1f} % |")
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
