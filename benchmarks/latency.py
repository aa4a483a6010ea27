"""CPU latency of the ESP-MedSAM forward pass, beside a SAM ViT-B image encoder.

Usage: python benchmarks/latency.py [--threads 2] [--runs 5] [--out benchmarks/results/latency.md]

Median of ``--runs`` timed runs after two warm-up runs, random weights, random inputs. The peak RSS of a
1024² forward is measured in a fresh subprocess so that earlier runs do not inflate it.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from _report import cpu_description, report

from espmedsam import build_model
from espmedsam.models.sam_vit import SamViTConfig, SamViTEncoder


def median_seconds(fn, runs: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_model(model, images, bf16: bool):
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return model(images, ["xray"] * images.shape[0])


def espmedsam_rows(runs: int) -> list[tuple]:
    model = build_model("default")
    rows = []
    for size, batch in [(256, 1), (256, 8), (512, 1), (512, 8), (1024, 1)]:
        images = torch.randn(batch, 3, size, size)
        fp32 = median_seconds(lambda x=images: run_model(model, x, False), runs)
        bf16 = median_seconds(lambda x=images: run_model(model, x, True), runs)
        diff = (
            (run_model(model, images, False).masks - run_model(model, images, True).masks.float()).abs().max()
        )
        rows.append(("ESP-MedSAM (6 controllers), full forward", size, batch, fp32, bf16, float(diff)))
    return rows


def sam_rows(runs: int) -> list[tuple]:
    encoder = SamViTEncoder(SamViTConfig.vit_b()).eval()
    images = torch.randn(1, 3, 1024, 1024)

    def go(bf16: bool):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return encoder(images)

    return [
        (
            "SAM ViT-B image encoder only",
            1024,
            1,
            median_seconds(lambda: go(False), runs),
            median_seconds(lambda: go(True), runs),
            float("nan"),
        )
    ]


def forward_gflop(size: int = 1024) -> float:
    """Matmul and convolution GFLOP of one forward (attention score products not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model("default").requires_grad_(False)
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, size, size), "xray")
    return counter.get_total_flops() / 1e9


def gemm_peak_gflops(dtype: torch.dtype, runs: int) -> float:
    """Throughput of one large matmul: the most this CPU does in ``dtype`` with these threads."""
    a, b = torch.randn(4096, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    return 2 * 4096 * 2048 * 2048 / median_seconds(lambda: a @ b, runs) / 1e9


def peak_rss_mib(bf16: bool) -> float:
    """Peak resident memory of a fresh process doing one 1024² forward."""
    code = (
        "import torch; from espmedsam import build_model; m = build_model();"
        f"torch.set_num_threads({torch.get_num_threads()});"
        "x = torch.randn(1, 3, 1024, 1024);\n"
        "with torch.inference_mode(), "
        f"torch.autocast('cpu', dtype=torch.bfloat16, enabled={bf16}): m(x, 'xray')\n"
        # VmHWM, not ru_maxrss: ru_maxrss survives exec and would report the parent's peak
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--skip-sam", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = espmedsam_rows(args.runs) + ([] if args.skip_sam else sam_rows(args.runs))
    lines = [
        f"torch {torch.__version__}, {cpu_description()}, {args.threads} threads, "
        f"median of {args.runs} runs after 2 warm-up runs",
        "",
        "| model | input | batch | fp32 eager (s) | bf16 autocast (s) | bf16 speed-up "
        "| max abs diff of mask logits |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, size, batch, fp32, bf16, diff in rows:
        lines.append(
            f"| {name} | {size}² | {batch} | {fp32:.3f} | {bf16:.3f} | {fp32 / bf16:.1f}x | "
            f"{'—' if diff != diff else f'{diff:.3f}'} |"
        )
    lines += [
        "",
        f"Peak RSS of one 1024² forward in a fresh process: fp32 {peak_rss_mib(False):.0f} MiB, "
        f"bf16 {peak_rss_mib(True):.0f} MiB (includes the Python interpreter and torch).",
    ]
    gflop = forward_gflop()
    bf16_peak = gemm_peak_gflops(torch.bfloat16, args.runs)
    fp32_peak = gemm_peak_gflops(torch.float32, args.runs)
    lines += [
        f"One 1024² forward: {gflop:.1f} GFLOP in matmuls and convolutions. A large matmul runs at "
        f"{bf16_peak:.0f} GFLOP/s in bf16 and {fp32_peak:.0f} GFLOP/s in fp32 "
        f"here, so the compute floor of a bf16 1024² forward is about {gflop / bf16_peak:.2f} s.",
    ]
    text = "\n".join(lines)
    report(text, args.out)


if __name__ == "__main__":
    main()
