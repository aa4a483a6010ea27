"""The bundled encoder's stem and stage 0 in OpenVINO, whole and in horizontal strips, and its profile.

Usage: python benchmarks/stage0_strips.py [--side 512] [--strips 1 4 8 16 32] [--rounds 15] [--out FILE]

At LiteMedSAM's pointwise stem, stage 0's MBConvs run at the full input resolution: at 512² each widens
64 channels to 256 over 262,144 positions, a 128 MiB bf16 map written and read by each of its layers.
OpenVINO runs a graph node by node, so each map goes out to memory and back. Cutting the image into
strips (each with the two rows of margin its 3x3 convolutions and stride-2 merge need, the margins'
outputs dropped) gives the same values with maps a strip high, which a cache might hold. Timed in
turns, median of ``--rounds``; then the per-node profile (``PERF_COUNT``) of the whole graph.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _report import cpu_description, report
from torch import nn

from espmedsam.checkpoints.native import default_checkpoint, load_model
from espmedsam.models.graph_layout import graph_layout
from espmedsam.models.tinyvit import TinyViT
from espmedsam.openvino_backend import cpu_has_bf16

MARGIN = 4  # input rows each side: two MBConvs' 3x3 convs and the merge's stride-2 one, kept even


class StageZero(nn.Module):
    """(B, 3, S, S) -> stage 0's (B, S/2, S/2, C1) output, computed in ``strips`` horizontal strips."""

    def __init__(self, encoder: TinyViT, strips: int) -> None:
        super().__init__()
        self.encoder, self.strips = encoder, strips

    def whole(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.layers[0](self.encoder.patch_embed(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = x.shape[2]
        rows = side // 2
        step = rows // self.strips
        pieces = []
        for k in range(self.strips):
            first, last = k * step, rows if k == self.strips - 1 else (k + 1) * step
            top, bottom = max(0, 2 * first - MARGIN), min(side, 2 * last + MARGIN)
            out = self.whole(x[:, :, top:bottom])
            skip = (2 * first - top) // 2
            pieces.append(out[:, skip : skip + last - first])
        return torch.cat(pieces, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--strips", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import openvino as ov

    torch.set_num_threads(args.threads)
    encoder = load_model(default_checkpoint()).eval().image_encoder
    x = torch.randn(1, 3, args.side, args.side)
    precision = "bf16" if cpu_has_bf16() else "f32"
    config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
    config["INFERENCE_NUM_THREADS"] = args.threads
    core, requests, largest_error = ov.Core(), {}, 0.0
    with torch.inference_mode():
        reference = StageZero(encoder, 1)(x)
        for strips in args.strips:
            module = StageZero(encoder, strips).eval()
            largest_error = max(largest_error, float((module(x) - reference).abs().max()))
            with graph_layout():
                graph = ov.convert_model(module, example_input=x)
            profile = {"PERF_COUNT": True} if strips == 1 else {}
            requests[strips] = core.compile_model(graph, "CPU", config | profile).create_infer_request()
    feed = {0: x.numpy()}
    seconds: dict[int, list[float]] = {strips: [] for strips in requests}
    for round_ in range(args.rounds + 1):
        for strips, request in requests.items():
            start = time.perf_counter()
            request.infer(feed)
            if round_:  # the first round warms up
                seconds[strips].append(time.perf_counter() - start)
    whole = statistics.median(seconds[args.strips[0]])
    lines = [
        f"`python benchmarks/stage0_strips.py --side {args.side} --strips {' '.join(map(str, args.strips))}"
        f" --rounds {args.rounds}`; {cpu_description()}, {args.threads} threads, OpenVINO {precision}, "
        f"batch 1, forwards in turns; eager strips against eager whole: max |difference| {largest_error:.1e}",
        "",
        "| strips | median ms (fastest) | against the first |",
        "|---:|---:|---:|",
        *(
            f"| {strips} | {1000 * statistics.median(t):.1f} ({1000 * min(t):.1f}) | "
            f"×{statistics.median(t) / whole:.3f} |"
            for strips, t in seconds.items()
        ),
    ]
    if 1 in requests:
        lines += ["", *_profile(requests[1])]
    report("\n".join(lines), args.out)


def _profile(request) -> list[str]:
    """The whole graph's nodes by time, those above 2 % of it."""
    nodes = [
        (info.real_time.total_seconds(), info.node_type, info.exec_type, info.node_name)
        for info in request.get_profiling_info()
    ]
    total = sum(t for t, *_ in nodes)
    rows = [
        f"| {name.split('/')[0].removeprefix('__module.encoder.')} | {kind} ({kernel}) | "
        f"{1000 * t:.1f} | {100 * t / total:.0f} % |"
        for t, kind, kernel, name in sorted(nodes, reverse=True)
        if t > 0.02 * total
    ]
    header = f"profile of the whole graph, last forward ({1000 * total:.1f} ms in its nodes):"
    return [header, "", "| node | type (kernel) | ms | share |", "|---|---|---:|---:|", *rows]


if __name__ == "__main__":
    main()
