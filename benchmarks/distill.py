"""MMDKD on this machine: held-out embedding MSE before/after, and one epoch with vs without the cache.

Usage: python benchmarks/distill.py [--per-dataset 40] [--epochs 10] [--timing-images 64]
                                    [--out benchmarks/results/distill.md]

No SAM weights can be downloaded here, so the teacher is a SAM ViT-B image encoder with random weights
(seed 0); the student is the default ESP-MedSAM at random initialisation. Images are the first
``--per-dataset`` training images of each dataset in ./data (the six datasets of the segmentation recipe).

1. ``espmedsam distill common``'s function with the ``mmdkd_cpu_256`` recipe's common stage (10 % held
   out): held-out MSE and cosine similarity per epoch (curve in ``distill_curves.png`` beside ``--out``).
2. One epoch of the modality stage (busi images, ultrasound controller), same images and student, the
   teacher's embeddings from the cache vs recomputed in every step (the official script), both fp32
   teachers; plus the cache's size per image and its read throughput.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

import torch
from _report import report

from espmedsam import build_model
from espmedsam.config import load_distill_config
from espmedsam.data.dataset import KNOWN_DATASETS
from espmedsam.distill.cache import CacheKey, EmbeddingCache
from espmedsam.distill.images import list_images
from espmedsam.distill.mmdkd import cache_folder_name, distill
from espmedsam.models.sam_vit import SamViTConfig, SamViTEncoder


def teacher_vit_b() -> SamViTEncoder:
    torch.manual_seed(0)
    return SamViTEncoder(SamViTConfig.vit_b()).eval()


def student() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("default")


def common_stage(images, epochs: int, work: Path, curves: Path) -> tuple[str, float]:
    config = load_distill_config("mmdkd_cpu_256", "common", [f"epochs={epochs}"])
    config = dataclasses.replace(config, cache_dir=str(work / "cache"), out_dir=str(work / "common"))
    start = time.perf_counter()
    result = distill(student(), teacher_vit_b(), images, config, stage="common")
    total = time.perf_counter() - start
    curves.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(work / "common" / "curves.png", curves)
    rows = ["| epoch | train MSE | held-out MSE | held-out cosine |", "|---:|---:|---:|---:|"]
    for r in result.records:
        train = f"{r['train_mse']:.4f}" if "train_mse" in r else "-"
        rows.append(f"| {r['epoch']} | {train} | {r['held_out_mse']:.4f} | {r['held_out_cosine']:.3f} |")
    first, last = result.records[0], result.records[-1]
    cut = 100 * (1 - last["held_out_mse"] / first["held_out_mse"])
    text = (
        f"Common stage, {len(images)} images (10 % held out), {epochs} epochs, recipe mmdkd_cpu_256 "
        f"(256², 2 variants, Adam 1e-3): held-out MSE {first['held_out_mse']:.4f} -> "
        f"{last['held_out_mse']:.4f} (-{cut:.1f} %), cosine {first['held_out_cosine']:.3f} -> "
        f"{last['held_out_cosine']:.3f}; teacher embedded {result.teacher_images} inputs; "
        f"{total / 60:.1f} min in all.\n\n" + "\n".join(rows)
    )
    return text, cut


def epoch_timing(images, work: Path) -> str:
    config = load_distill_config("mmdkd_cpu_256", "modality", ["epochs=1", "held_out=0", "variants=1"])
    cached = dataclasses.replace(config, cache_dir=str(work / "timing-cache"), out_dir=str(work / "t1"))
    start = time.perf_counter()
    build = distill(student(), teacher_vit_b(), images, cached, stage="modality")  # fills the cache
    build_s = time.perf_counter() - start - build.epoch_seconds[0]
    warm = distill(student(), teacher_vit_b(), images, cached, stage="modality")
    recompute = dataclasses.replace(config, use_cache=False, out_dir=str(work / "t2"))
    slow = distill(student(), teacher_vit_b(), images, recompute, stage="modality")
    with_cache, without = warm.epoch_seconds[0], slow.epoch_seconds[0]
    cache = EmbeddingCache(work / "timing-cache", cache_folder_name(teacher_vit_b(), student(), cached))
    keys = [CacheKey(image.digest, config.image_size, 0) for image in images]
    size = sum(cache.path(key).stat().st_size for key in keys) / len(keys)
    start = time.perf_counter()
    for key in keys:
        cache.get(key)
    read_s = time.perf_counter() - start
    return (
        f"One modality-stage epoch, {len(images)} busi images at 256², batch 8, ViT-B teacher fp32, "
        f"student bf16 autocast: **{with_cache:.1f} s with the cache, {without:.1f} s recomputing the "
        f"teacher in every step ({without / with_cache:.1f}x)**. Building the cache once: {build_s:.1f} s "
        f"({build_s / len(images):.2f} s per image). Cache entry: {size / 1024:.1f} KiB per image and "
        f"variant (float16 .npy); reading all {len(keys)} entries (page cache warm): "
        f"{len(keys) / read_s:.0f} entries/s, {size * len(keys) / read_s / 2**20:.0f} MiB/s."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data"))
    parser.add_argument("--per-dataset", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--timing-images", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images = [
        image
        for name, modality in list(KNOWN_DATASETS.items())[:6]  # the six in-domain sets
        for image in list_images(args.data / name, modality)[: args.per_dataset]
    ]
    busi = list_images(args.data / "busi", "ultrasound")[: args.timing_images]
    curves = (args.out.parent if args.out else Path(".")) / "distill_curves.png"
    with tempfile.TemporaryDirectory() as work:
        common, _ = common_stage(images, args.epochs, Path(work), curves)
        timing = epoch_timing(busi, Path(work))
    report(f"{common}\n\n{timing}\n\nCurves: {curves.name}. Threads: {args.threads}.", args.out)


if __name__ == "__main__":
    main()
