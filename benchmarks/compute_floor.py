"""The bundled model's forward against this CPU's compute floor, per modality at its own input size.

Usage: python benchmarks/compute_floor.py [--checkpoint CKPT] [--onnx MODEL.onnx ...] [--openvino]
       [--no-onnxruntime] [--runs 5] [--profile] [--out FILE]

Floor = the forward's matmul/conv FLOPs (torch's FlopCounterMode) / this CPU's bf16 matmul rate, measured
in the same run on a large (4096²) bf16 matmul. Each backend's forward (batch 1, one image per modality) is
timed and divided by the floor: torch fp32 and bf16 autocast, and with ``--onnx`` the exported file in
onnxruntime (fp32) and, with ``--openvino``, in OpenVINO (bf16 where the CPU has it). In the same run the
official-layout ESP-MedSAM (MobileSAM's stem) runs its paper workload, one 1024² image in fp32, and each
backend's six images are set against six such forwards. ``--onnx`` given more than once compares exported
files of the same weights in one run (columns named by file). ``--profile`` adds the top operators by
self CPU time (torch bf16).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _report import cpu_description, median_seconds, report

from espmedsam.checkpoints.native import default_checkpoint, load_model
from espmedsam.size_front import forward_gflop


def matmul_rate(side: int = 4096, runs: int = 5) -> float:
    """FLOP/s of a side x side bf16 matmul."""
    a, b = torch.randn(side, side, dtype=torch.bfloat16), torch.randn(side, side, dtype=torch.bfloat16)
    return 2 * side**3 / median_seconds(lambda: a @ b, runs)


def torch_seconds(model, size: int, modality: str, runs: int, bfloat16: bool) -> float:
    x = torch.randn(1, 3, size, size)

    def run() -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
            model(x, modality)

    return median_seconds(run, runs)


def official_seconds(runs: int) -> float:
    """One 1024² forward of the official-layout model in fp32 (the paper's workload; weights random)."""
    from espmedsam.models.registry import build_model

    return torch_seconds(build_model("official").eval(), 1024, "dermoscopy", runs, bfloat16=False)


def onnx_seconds(backend, size: int, modality_id: int, runs: int) -> float:
    import numpy as np

    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    ids = np.array([modality_id], dtype=np.int64)
    return median_seconds(lambda: backend.segment(x, ids), runs)


def exported_backends(onnx: list[Path], openvino: bool, onnxruntime: bool, threads: int) -> dict:
    """The columns of the exported files: onnxruntime, and OpenVINO when asked for (each file's name
    in the column when there are several)."""
    backends = {}
    for path in onnx:
        name = f" ({path.stem})" if len(onnx) > 1 else ""
        if onnxruntime:
            from espmedsam.onnx_backend import OnnxBackend

            backends[f"onnxruntime fp32{name}"] = OnnxBackend(path, threads=threads)
        if openvino:
            from espmedsam.openvino_backend import OpenVinoBackend

            backend = OpenVinoBackend(path, threads=threads)
            backends[f"openvino {backend.precision}{name}"] = backend
    return backends


def profile_table(model, size: int, modality: str, rows: int = 15) -> str:
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(1, 3, size, size)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, modality)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(x, modality)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument(
        "--onnx", type=Path, action="append", default=[], help="Exported model (repeatable) for the columns."
    )
    parser.add_argument("--openvino", action="store_true", help="Also run the --onnx files in OpenVINO.")
    parser.add_argument("--no-onnxruntime", action="store_true", help="No onnxruntime columns.")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint or default_checkpoint())
    exported = exported_backends(args.onnx, args.openvino, not args.no_onnxruntime, args.threads)
    rate = matmul_rate()
    official = official_seconds(args.runs)
    columns = ["torch fp32", "torch bf16", *exported]
    lines = [
        f"{cpu_description()}; bf16 matmul rate {rate / 1e12:.3f} TFLOP/s (4096², median of 5)",
        f"median of {args.runs} forwards after one warm-up, batch 1; ratio = time / floor",
        "",
        "| modality | input | GFLOP | floor (s) | " + " | ".join(f"{c} s (×floor)" for c in columns) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(columns),
    ]
    totals, floor_total = [0.0] * len(columns), 0.0
    for index, modality in enumerate(model.config.modalities):
        size = model.input_size(modality)
        flops = 1e9 * forward_gflop(model, modality, [size])[size]
        floor = flops / rate
        times = [torch_seconds(model, size, modality, args.runs, bf16) for bf16 in (False, True)]
        times += [onnx_seconds(backend, size, index, args.runs) for backend in exported.values()]
        totals = [total + t for total, t in zip(totals, times, strict=True)]
        floor_total += floor
        cells = " | ".join(f"{t:.3f} ({t / floor:.1f}×)" for t in times)
        lines.append(f"| {modality} | {size}² | {flops / 1e9:.2f} | {floor:.4f} | {cells} |")
    workload = len(model.config.modalities) * official
    cells = " | ".join(f"{t:.3f} ({t / floor_total:.1f}×)" for t in totals)
    lines.append(f"| **six, summed** | | | {floor_total:.4f} | {cells} |")
    lines += [
        "",
        f"official-layout model, one 1024² forward in fp32: {official:.3f} s; six of them {workload:.3f} s",
        "",
        "| backend | six images (s) | × faster than the official workload | × own floor |",
        "|---|---:|---:|---:|",
        *(
            f"| {name} | {total:.3f} | {workload / total:.1f}× | {total / floor_total:.1f}× |"
            for name, total in zip(columns, totals, strict=True)
        ),
    ]
    if args.profile:
        modality = model.config.modalities[0]
        lines += [
            "",
            f"top operators, torch bf16, {modality}:",
            "```",
            profile_table(model, 192, modality),
            "```",
        ]
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
