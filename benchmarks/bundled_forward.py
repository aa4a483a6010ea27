"""Forward time of one image per modality at the shipped input sizes: two checkpoints in one run.

Usage: python benchmarks/bundled_forward.py BEFORE.safetensors AFTER.safetensors [--threads 2] [--runs 5]
       [--out benchmarks/results/bundled_forward.md]

Each checkpoint runs in process, bf16 autocast, one (1, 3, S, S) input per modality at its own input
size; the median of ``--runs`` timed runs after one warm-up. The AFTER checkpoint is also timed without
its controllers and without its detail branch (the same weights otherwise), which gives their shares.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from pathlib import Path

import torch
from _report import cpu_description, median_seconds, report

from espmedsam.checkpoints.native import load_model
from espmedsam.models.espmedsam import ESPMedSAM


def per_modality_seconds(model: ESPMedSAM, runs: int) -> dict[str, float]:
    seconds = {}
    for name in model.modalities:
        size = model.input_size(name)
        x = torch.rand(1, 3, size, size)

        def forward(x=x, name=name):
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                return model(x, [name])

        seconds[name] = median_seconds(forward, runs)
    return seconds


def without_controllers(model: ESPMedSAM) -> ESPMedSAM:
    bare = copy.deepcopy(model)
    bare.config = dataclasses.replace(
        bare.config, controller=dataclasses.replace(bare.config.controller, enabled=False)
    )
    return bare  # route() reads the flag: the shared blocks run alone


def without_detail(model: ESPMedSAM) -> ESPMedSAM:
    bare = copy.deepcopy(model)
    bare.decoder.detail_branch = None
    return bare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    before, after = load_model(args.before), load_model(args.after)
    variants = {f"before ({args.before.name})": before, f"after ({args.after.name})": after}
    if after.config.controller.enabled:
        variants["after, controllers off"] = without_controllers(after)
    if after.decoder.detail_branch is not None:
        variants["after, detail branch off"] = without_detail(after)
    timings = {label: per_modality_seconds(model, args.runs) for label, model in variants.items()}
    names = list(after.modalities)
    sizes = " / ".join(f"{n} {after.input_size(n)}" for n in names)
    lines = [
        f"torch {torch.__version__}, {cpu_description()}, {args.threads} threads, bf16 autocast, "
        f"median of {args.runs} runs after one warm-up; sizes {sizes}",
        "",
        "| model | " + " | ".join(names) + " | sum (s) | vs before |",
        "|---|" + "---:|" * (len(names) + 2),
    ]
    base = sum(timings[next(iter(timings))].values())
    for label, seconds in timings.items():
        total = sum(seconds.values())
        cells = " | ".join(f"{seconds[n]:.3f}" for n in names)
        lines.append(f"| {label} | {cells} | {total:.3f} | {100 * (total / base - 1):+.1f} % |")
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
