"""OpenVINO's per-operator profile of an exported graph's segmentation at one input side, by kind of operator.

Usage: python benchmarks/openvino_profile.py --onnx FILE.onnx [--side 512] [--modality 3] [--rounds 4]
       [--threads 2] [--top 12] [--out FILE]

The graph is cut to the images-to-masks path, compiled in bf16 with the latency hint and ``PERF_COUNT``,
run once to warm up and then ``--rounds`` times; each compiled node's time (``get_profiling_info``) is
averaged over the rounds and summed by (operator type, kernel), and the slowest single nodes are listed.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import numpy as np
from _report import cpu_description, report

from espmedsam.openvino_backend import cut_graph


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

    core = ov.Core()
    graph = cut_graph(core.read_model(str(args.onnx)), ["images", "modality"], ["masks"])
    graph.reshape({"images": [1, 3, args.side, args.side], "modality": [1]})
    config = {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True,
              "INFERENCE_NUM_THREADS": args.threads}  # fmt: skip
    request = core.compile_model(graph, "CPU", config).create_infer_request()
    inputs = {"images": np.random.default_rng(0).standard_normal((1, 3, args.side, args.side), np.float32),
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
        f"{args.modality}`; {cpu_description()}, {args.threads} threads, OpenVINO bf16; "
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
