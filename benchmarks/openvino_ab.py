"""Exported files of the same weights timed in OpenVINO, interleaved, per input side.

Usage: python benchmarks/openvino_ab.py --onnx A.onnx [--onnx B.onnx ...] [--official] [--rounds 20]
       [--threads 2] [--out FILE]

Each file's segmentation graph (images -> masks) is compiled at each shipped input side (bf16 where the
CPU has it, the latency hint, as ``predict`` runs it), then the forwards run in turns: one of each file at
each side, ``--rounds`` times. A CPU shared with other machines slows down and speeds up by tens of per
cent within minutes; forwards in turns see the same slow and fast spells, so the ratio between files
holds where times taken one file after the other would not. Reported: the median and the fastest forward
of each, and each file's median against the first file's; and the six shipped images (one per modality
at its side) summed from the medians.

``--official``: each round also runs the official-layout model's paper workload, one 1024² forward in
torch fp32 (as ``compute_floor.py`` does, one after the other there), and each file's six images are set
against six such forwards: "× faster than the official workload", measured in turns.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from _report import cpu_description, report

from espmedsam.checkpoints.native import default_checkpoint, load_model
from espmedsam.checkpoints.onnx_export import INPUTS, OUTPUTS
from espmedsam.openvino_backend import compile_graph, cpu_has_bf16


def shipped_sides() -> tuple[dict[int, int], dict[int, int]]:
    """Each shipped input side -> the index of one modality that runs at it, and -> how many do."""
    model = load_model(default_checkpoint())
    sides: dict[int, int] = {}
    counts: dict[int, int] = {}
    for index, name in enumerate(model.modalities):
        side = model.input_size(name)
        sides.setdefault(side, index)
        counts[side] = counts.get(side, 0) + 1
    return dict(sorted(sides.items())), counts


def official_forward(threads: int):
    """One 1024² fp32 forward of the official-layout model (random weights), as a callable."""
    import torch

    from espmedsam.models.registry import build_model

    torch.set_num_threads(threads)
    model = build_model("official").eval()
    x = torch.randn(1, 3, 1024, 1024)

    def run() -> None:
        with torch.inference_mode():
            model(x, "dermoscopy")

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, action="append", required=True)
    parser.add_argument("--official", action="store_true", help="Also the official workload, in turns.")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import openvino as ov

    core, precision = ov.Core(), "bf16" if cpu_has_bf16() else "f32"
    images, modality = INPUTS
    requests, feeds = {}, {}
    sides, counts = shipped_sides()
    for side, index in sides.items():
        shapes = {images: [1, 3, side, side], modality: [1]}
        x = np.random.default_rng(0).standard_normal((1, 3, side, side)).astype(np.float32)
        feeds[side] = {images: x, modality: np.array([index], dtype=np.int64)}
        for path in args.onnx:
            compiled = compile_graph(
                core, path, shapes, precision, outputs=[OUTPUTS[0]], threads=args.threads
            )
            requests[path, side] = compiled.create_infer_request()
    official = official_forward(args.threads) if args.official else None
    for (_, side), request in requests.items():  # warm-up
        request.infer(feeds[side])
    if official is not None:
        official()
    seconds: dict[tuple, list[float]] = {key: [] for key in requests}
    official_seconds: list[float] = []
    for _ in range(args.rounds):
        for (path, side), request in requests.items():
            start = time.perf_counter()
            request.infer(feeds[side])
            seconds[path, side].append(time.perf_counter() - start)
        if official is not None:
            start = time.perf_counter()
            official()
            official_seconds.append(time.perf_counter() - start)
    names = [path.stem for path in args.onnx]
    lines = [
        f"`python benchmarks/openvino_ab.py {' '.join(f'--onnx {p.name}' for p in args.onnx)}"
        f"{' --official' if args.official else ''} --rounds {args.rounds}`; {cpu_description()}, "
        f"{args.threads} threads, OpenVINO {precision}, batch 1; "
        "forwards in turns; median (fastest) in ms, and the median against the first file's",
        "",
        "| side | " + " | ".join(names) + " |",
        "|---:|" + "---:|" * len(names),
    ]
    six = [0.0] * len(names)
    for side in feeds:
        medians = [statistics.median(seconds[path, side]) for path in args.onnx]
        cells = [
            f"{1000 * m:.1f} ({1000 * min(seconds[path, side]):.1f}) ×{m / medians[0]:.3f}"
            for m, path in zip(medians, args.onnx, strict=True)
        ]
        six = [total + counts[side] * m for total, m in zip(six, medians, strict=True)]
        lines.append(f"| {side}² | " + " | ".join(cells) + " |")
    cells = [f"**{1000 * t:.1f}** ×{t / six[0]:.3f}" for t in six]
    lines.append("| **six images, one per modality** | " + " | ".join(cells) + " |")
    if official_seconds:
        workload = sum(counts.values()) * statistics.median(official_seconds)
        lines += [
            "",
            f"official-layout model, one 1024² forward in fp32, in the same turns: median "
            f"{statistics.median(official_seconds):.3f} s (fastest {min(official_seconds):.3f}); six of them "
            f"{workload:.3f} s",
            "",
            "| file | six images (s) | × faster than the official workload |",
            "|---|---:|---:|",
            *(f"| {name} | {t:.3f} | **{workload / t:.2f}×** |" for name, t in zip(names, six, strict=True)),
        ]
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
