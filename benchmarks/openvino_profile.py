"""OpenVINO's per-operator profile of an exported graph's segmentation at one input side, by kind of operator.

Usage: python benchmarks/openvino_profile.py --onnx FILE.onnx [--side 512] [--modality 3] [--rounds 4]
       [--threads 2] [--top 12] [--out FILE]

The graph is cut to the images-to-masks path and compiled by ``compile_graph`` (bf16, f32 without bf16
units; the latency hint; ``PERF_COUNT``), run once to warm up and then ``--rounds`` times; each compiled
node's time (``get_profiling_info``) is averaged over the rounds and summed by (operator type, kernel),
and the slowest single nodes are listed.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import numpy as np
from _report import cpu_description, report

from espmedsam.openvino_backend import compile_graph, cpu_has_bf16


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--onnx", type=Path, required=True)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--modality", type=int, default=3, help="index of the modality routed (3: fundus)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import openvino as ov

    side = args.side
    shapes = {"images": [1, 3, side, side], "modality": [1]}
    precision = "bf16" if cpu_has_bf16() else "f32"
    compiled = compile_graph(
        ov.Core(), args.onnx, shapes, precision, outputs=["masks"], threads=args.threads, profile=True
    )
    request = compiled.create_infer_request()
    inputs = {"images": np.random.default_rng(0).standard_normal((1, 3, side, side), np.float32),
              "modality": np.array([args.modality])}  # fmt: skip
    request.infer(inputs)
    by_kind: collections.Counter[str] = collections.Counter()
    by_node: collections.Counter[str] = collections.Counter()
    for _ in range(args.rounds):
        request.infer(inputs)
        for node in request.get_profiling_info():
            ms = node.real_time.total_seconds() * 1000 / args.rounds
            by_kind[f"{node.node_type} ({node.exec_type})"] += ms
            by_node[f"{node.node_name} ({node.node_type})"] += ms
    total = sum(by_kind.values())
    lines = [
        f"`python benchmarks/openvino_profile.py --onnx {args.onnx.name} --side {args.side} --modality "
        f"{args.modality}`; {cpu_description()}, {args.threads} threads, OpenVINO {precision}; "
        f"mean of {args.rounds} forwards, summed node times {total:.1f} ms",
        "",
        "| operator (kernel) | ms | share |",
        "|---|---:|---:|",
        *(f"| {kind} | {ms:.1f} | {100 * ms / total:.1f} % |" for kind, ms in by_kind.most_common()),
        "",
        "| slowest nodes | ms |",
        "|---|---:|",
        *(f"| {name} | {ms:.1f} |" for name, ms in by_node.most_common(args.top)),
    ]
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
