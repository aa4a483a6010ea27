"""One request at a time (the latency hint, as ``predict`` runs) against requests side by side in OpenVINO's
streams (the throughput hint), per shipped input side, in turns.

Usage: python benchmarks/openvino_streams.py --onnx FILE [--rounds 6] [--images 4] [--threads 2] [--out FILE]

Each side's segmentation graph is compiled twice, bf16 where the CPU has it: with the latency hint, whose
one request uses every thread, and with the throughput hint, whose streams each take a share of the
threads and run their own request. Each round passes ``--images`` forwards through the first, one after
the other, then the same number through the second, all queued at once; reported are the median per-image
times over the rounds and their ratio. A ratio above 1 is what a folder prediction could gain by running
images side by side instead of one at a time on all threads.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from _report import cpu_description, report
from openvino_ab import shipped_sides

from espmedsam.checkpoints.onnx_export import INPUTS, OUTPUTS
from espmedsam.openvino_backend import compile_graph, cpu_has_bf16


def per_image_seconds(run, images: int) -> float:
    start = time.perf_counter()
    run(images)
    return (time.perf_counter() - start) / images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import openvino as ov

    core, precision = ov.Core(), "bf16" if cpu_has_bf16() else "f32"
    images, modality = INPUTS
    sides, counts = shipped_sides()
    lines = [
        f"`python benchmarks/openvino_streams.py --onnx {args.onnx.name} --rounds {args.rounds} --images "
        f"{args.images}`; {cpu_description()}, {args.threads} threads, OpenVINO {precision}, batch 1; "
        "median ms per image over the rounds",
        "",
        "| side | latency hint, one at a time | throughput hint, side by side (streams) | gain |",
        "|---:|---:|---:|---:|",
    ]
    totals = [0.0, 0.0]
    for side, index in sides.items():
        shapes = {images: [1, 3, side, side], modality: [1]}
        x = np.random.default_rng(0).standard_normal((1, 3, side, side)).astype(np.float32)
        feed = {images: x, modality: np.array([index], dtype=np.int64)}

        def compiled(hint: str, shapes=shapes):
            return compile_graph(
                core, args.onnx, shapes, precision, outputs=[OUTPUTS[0]], threads=args.threads, hint=hint
            )

        request = compiled("LATENCY").create_infer_request()
        streamed = compiled("THROUGHPUT")
        streams = streamed.get_property("NUM_STREAMS")
        queue = ov.AsyncInferQueue(streamed, streamed.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))

        def one_at_a_time(n: int, request=request, feed=feed) -> None:
            for _ in range(n):
                request.infer(feed)

        def side_by_side(n: int, queue=queue, feed=feed) -> None:
            for _ in range(n):
                queue.start_async(feed)
            queue.wait_all()

        one_at_a_time(1), side_by_side(2)  # warm-up
        latency, throughput = [], []
        for _ in range(args.rounds):
            latency.append(per_image_seconds(one_at_a_time, args.images))
            throughput.append(per_image_seconds(side_by_side, args.images))
        a, b = statistics.median(latency), statistics.median(throughput)
        totals = [totals[0] + counts[side] * a, totals[1] + counts[side] * b]
        lines.append(f"| {side}² | {1000 * a:.1f} | {1000 * b:.1f} ({streams} streams) | ×{a / b:.2f} |")
    lines.append(
        f"| **six images, one per modality** | **{1000 * totals[0]:.1f}** | **{1000 * totals[1]:.1f}** | "
        f"**×{totals[0] / totals[1]:.2f}** |"
    )
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
