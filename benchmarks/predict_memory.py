"""Resident memory while ``predict_files`` runs over a folder of 1,000 images (the six test splits, cycled).

Usage: python benchmarks/predict_memory.py [--checkpoint CKPT] [--images 1000] [--openvino]
    [--max-graphs N] [--onnx MODEL.onnx] [--out FILE]

``--openvino``: the native checkpoint with its graph in OpenVINO (``predict --backend openvino``), the
graph exported or taken from the cache before the first RSS reading after loading. ``--onnx``: an
exported file in OpenVINO (``predict -c MODEL.onnx``, ``--backend auto`` with OpenVINO installed).

RSS is read from /proc/self/status (VmRSS now, VmHWM = peak) before the model loads, after it loads, and
after every 100 files.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _data import IN_DOMAIN, split_images
from _report import report

from espmedsam.checkpoints.native import default_checkpoint, load_model
from espmedsam.predict import Predictor
from espmedsam.predict_files import predict_files


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size in MB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--openvino", action="store_true", help="The graph in OpenVINO.")
    parser.add_argument("--max-graphs", type=int, default=None, help="OpenVINO: compiled sides kept at once")
    parser.add_argument("--onnx", type=Path, default=None, help="An exported file, run in OpenVINO.")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start_rss = rss_mb()[0]
    if args.onnx:
        from espmedsam.openvino_backend import OpenVinoBackend

        model = OpenVinoBackend(args.onnx, threads=args.threads, max_graphs=args.max_graphs)
    else:
        model = load_model(args.checkpoint or default_checkpoint())
    if args.openvino and not args.onnx:
        from espmedsam.openvino_encoder import use_openvino_encoder

        model = use_openvino_encoder(model, threads=args.threads, max_graphs=args.max_graphs)
    predictor = Predictor(model, device="cpu")
    if args.openvino and not args.onnx:
        model.image_encoder.prepare(predictor.input_size(m) for m in predictor.modalities)
    loaded_rss = rss_mb()[0]
    sources = [path for path, _ in split_images(IN_DOMAIN, "test")]
    rows = ["| files done | RSS (MB) | peak RSS (MB) | elapsed (s) |", "|---:|---:|---:|---:|"]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        inputs = Path(folder) / "inputs"
        inputs.mkdir()
        paths = []
        for i in range(args.images):  # links, so the folder holds 1,000 distinct names
            source = sources[i % len(sources)]
            link = inputs / f"{i:04d}_{source.name}"
            link.symlink_to(source.resolve())
            paths.append(link)
        for done, result in enumerate(predict_files(predictor, paths, Path(folder) / "out"), 1):
            if not result.ok:
                raise SystemExit(result.error)
            if done % 100 == 0:
                now, peak = rss_mb()
                elapsed = time.perf_counter() - start
                rows.append(f"| {done} | {now:.0f} | {peak:.0f} | {elapsed:.0f} |")
    lines = [
        f"{args.images} images (the {len(sources)} in-domain test images, cycled), "
        f"{_backend_name(args)}"
        f"{f', at most {args.max_graphs} compiled sides' if args.max_graphs else ''}, "
        f"--modality auto, {args.threads} threads",
        f"RSS before loading the model {start_rss:.0f} MB, after {loaded_rss:.0f} MB",
        "",
        *rows,
    ]
    report("\n".join(lines), args.out)


def _backend_name(args: argparse.Namespace) -> str:
    if args.onnx:
        return f"exported file {args.onnx.name} in OpenVINO"
    return "OpenVINO graph (native checkpoint)" if args.openvino else "torch bf16"


if __name__ == "__main__":
    main()
