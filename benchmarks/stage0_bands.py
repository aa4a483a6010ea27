"""The encoder's stem and stage 0 in OpenVINO, whole and in horizontal bands, timed in turns.

Usage: python benchmarks/stage0_bands.py [--checkpoint CKPT] [--side 512] [--bands 1 4 8 16] [--rounds 15]
       [--threads 2] [--out FILE]

With LiteMedSAM's pointwise stem, stage 0's MBConvs run at the full input resolution: at 512² each of
their expanded activations is 134 MB in bf16, far more than the caches, so the stage moves its tensors
through memory several times. Cut into bands of rows (each with a 4-row halo, enough for its three 3x3
depthwise convolutions, so the output is the same), each band's activations are a fraction of that and
might stay in cache. Each variant is exported alone (``graph_layout``), compiled in bf16 with the latency
hint, and timed forward by forward in turns, so all see the same slow and fast spells of a shared CPU.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _report import cpu_description, report

from espmedsam.checkpoints.native import default_checkpoint, load_model
from espmedsam.models.graph_layout import graph_layout
from espmedsam.models.tinyvit import TinyViT
from espmedsam.openvino_backend import compile_graph

HALO = 4  # input rows above and below a band: 3 depthwise 3x3 convolutions need 3; 4 keeps bands even


class BandedStage0(torch.nn.Module):
    """(B, 3, S, S) -> stage 1's (B, S/2, S/2, C) tokens, the stem and stage 0 run on ``bands`` row bands."""

    def __init__(self, encoder: TinyViT, bands: int) -> None:
        super().__init__()
        self.encoder, self.bands = encoder, bands

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        side = images.shape[-2]
        rows = side // self.bands
        parts = []
        for k in range(self.bands):
            first, last = max(0, k * rows - HALO), min(side, (k + 1) * rows + HALO)
            tokens = self.encoder.prefix(images[:, :, first:last], 1)
            top = (k * rows - first) // 2
            parts.append(tokens[:, top : top + rows // 2])
        return torch.cat(parts, 1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--bands", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    encoder = load_model(args.checkpoint or default_checkpoint()).eval().requires_grad_(False).image_encoder
    images = torch.randn(1, 3, args.side, args.side)
    import openvino as ov

    core, compiled, differences = ov.Core(), {}, {}
    with tempfile.TemporaryDirectory() as folder, torch.no_grad(), graph_layout():
        whole = encoder.prefix(images, 1)
        for bands in args.bands:
            module = BandedStage0(encoder, bands).eval()  # export restores the mode it finds
            differences[bands] = float((module(images) - whole).abs().max())
            path = Path(folder) / f"bands{bands}.onnx"
            torch.onnx.export(module, (images,), path, input_names=["images"], dynamo=False)
            compiled[bands] = compile_graph(
                core, path, {"images": list(images.shape)}, "bf16", threads=args.threads
            )
    pixels, times = images.numpy(), {bands: [] for bands in compiled}
    for _ in range(args.rounds):
        for bands, model in compiled.items():
            start = time.perf_counter()
            model(pixels)
            times[bands].append(time.perf_counter() - start)
    lines = [
        f"`python benchmarks/stage0_bands.py --side {args.side} --rounds {args.rounds}`; "
        f"{cpu_description()}, {args.threads} threads, OpenVINO bf16; the stem and stage 0 at {args.side}², "
        "forwards in turns",
        "",
        "| bands | median ms (fastest) | against whole | largest difference from whole (eager) |",
        "|---:|---:|---:|---:|",
    ]
    base = statistics.median(times[args.bands[0]][1:])
    for bands, seconds in times.items():
        median = statistics.median(seconds[1:])
        lines.append(
            f"| {bands} | {1000 * median:.1f} ({1000 * min(seconds):.1f}) | ×{median / base:.3f} | "
            f"{differences[bands]:.1e} |"
        )
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
