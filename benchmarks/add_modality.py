"""Hold colonoscopy out of a training run, then add it with ``espmedsam add-modality``: test Dice of the added
modality beside a model trained on all six, the other five before and after, and the cost of the addition.

Usage: python benchmarks/add_modality.py --holdout RUN/best.safetensors [--reference CKPT] [--out FILE]

``--holdout`` is a model trained like the default recipe without CVC-ClinicDB (its colonoscopy channel never
trained; ``runs/holdout_colonoscopy.yaml`` in BENCHMARKS.md). The steps, each an ``espmedsam`` command:

1. ``export --drop-controllers`` (the decoder was trained on the controller-free encoder, as the default's)
   and ``modality remove colonoscopy``: a five-modality model;
2. ``add-modality colonoscopy --data data/cvc_clinicdb --from-modality dermoscopy --input-size 224``
   (the default's colonoscopy input size) with the ``add_modality`` recipe, timed;
3. ``evaluate`` on the test splits: the five-modality model on its five sets, the new one on all six, the
   reference (default: the bundled weights, trained on all six from the start) on all six.

It also checks that the five old modalities' mask logits are bitwise equal before and after, on the first
test image of each set.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _data import IN_DOMAIN, split_images
from _report import cpu_description, report

from espmedsam.checkpoints.native import default_checkpoint, load_model
from espmedsam.data.io import read_image
from espmedsam.predict import Predictor

OLD = tuple(name for name in IN_DOMAIN if name != "cvc_clinicdb")


def espmedsam(*args: str) -> float:
    """Run one command; its wall time in seconds."""
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "espmedsam", *args], check=True)
    return time.monotonic() - start


def evaluate(checkpoint: Path, datasets: tuple[str, ...], out: Path) -> dict[str, float]:
    data = [arg for name in datasets for arg in ("--data", f"data/{name}")]
    espmedsam("evaluate", "--checkpoint", str(checkpoint), *data, "--overlays", "0", "--out", str(out))
    summary = json.loads((out / "summary.json").read_text())
    return {name: summary["datasets"][name]["dice"]["mean"] for name in datasets}


def bitwise_same(before: Path, after: Path) -> dict[str, bool]:
    """Whether the old modalities' mask logits agree bit for bit on each set's first test image."""
    old, new = Predictor(load_model(before)), Predictor(load_model(after))
    same = {}
    for name in OLD:
        path, modality = split_images((name,), "test")[0]
        image = read_image(path)
        same[name] = np.array_equal(old.predict_logits(image, modality), new.predict_logits(image, modality))
    return same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--holdout", type=Path, required=True)
    parser.add_argument("--reference", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=Path("runs/add_modality_demo"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    work, reference = args.work, args.reference or default_checkpoint()
    work.mkdir(parents=True, exist_ok=True)
    six, five, added = (
        work / "holdout6.safetensors",
        work / "five.safetensors",
        work / "six_added.safetensors",
    )
    espmedsam("export", str(args.holdout), "--drop-controllers", "--out", str(six))
    espmedsam("modality", "remove", str(six), "colonoscopy", "--out", str(five))
    seconds = espmedsam(
        "add-modality", "colonoscopy", "--data", "data/cvc_clinicdb", "--init", str(five),
        "--from-modality", "dermoscopy", "--input-size", "224", "--out", str(added),
        "--run-dir", str(work / "run"),
    )  # fmt: skip
    log = [json.loads(line) for line in (work / "run" / "log.jsonl").read_text().splitlines()]
    trained = _trained_parameters(added)
    same = bitwise_same(five, added)
    before = evaluate(five, OLD, work / "eval_five")
    after = evaluate(added, IN_DOMAIN, work / "eval_added")
    full = evaluate(reference, IN_DOMAIN, work / "eval_reference")
    steps = max(r["step"] for r in log if r["kind"] == "train")
    lines = [
        "# Adding colonoscopy to a model trained without it",
        "",
        f"`python benchmarks/add_modality.py --holdout {args.holdout}`; {cpu_description()}, 2 threads.",
        "",
        "| test set | five modalities (before) | + colonoscopy added | bitwise same logits "
        "| all six from the start |",
        "|---|---:|---:|:---:|---:|",
    ]
    for name in IN_DOMAIN:
        old = f"{before[name]:.4f}" if name in before else "–"
        flag = ("yes" if same[name] else "**no**") if name in same else "–"
        lines.append(f"| {name} | {old} | {after[name]:.4f} | {flag} | {full[name]:.4f} |")
    lines += [
        "",
        f"Addition: {seconds / 60:.1f} min wall (`add-modality`, {steps} steps, embeddings of the cached "
        f"frozen encoder), {trained:,} trained parameters; reference: `{reference.name}`.",
    ]
    report("\n".join(lines), args.out)


def _trained_parameters(path: Path) -> int:
    from espmedsam.modality_edits import modality_parameter_names, trainable_count

    model = load_model(path)
    return trainable_count(model, modality_parameter_names(model, ["colonoscopy"]))


if __name__ == "__main__":
    main()
