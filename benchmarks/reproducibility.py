"""What changes a training run's weights: the same seed rerun, other thread counts, workers, bf16.

Usage: python benchmarks/reproducibility.py [--out FILE]

Each run is a fresh process training the ``tiny`` model for 2 epochs of 3 steps (batch 4, 64²) on the test
suite's two synthetic datasets, with seed 0; the table gives the largest absolute difference between the
final weights of two runs ("bitwise" when they are equal).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _report import report

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "train"))
from conftest import make_dataset  # noqa: E402  # the synthetic datasets of the training tests

RUN = """
import sys, torch
from espmedsam.config import TrainConfig
from espmedsam.train import train
base, out = sys.argv[1], sys.argv[2]
threads, bf16, workers = int(sys.argv[3]), sys.argv[4] == "1", int(sys.argv[5])
torch.set_num_threads(threads)
config = TrainConfig(
    name="r", model="tiny", data=(f"{base}/derm:dermoscopy", f"{base}/fundus:fundus"), image_size=64,
    batch_size=4, epochs=2, steps_per_epoch=3, warmup_steps=1, bf16=bf16, num_workers=workers, out_dir=out,
)
torch.save(torch.load(train(config).state_path, weights_only=True)["model"], out + ".pt")
"""

# label: (torch threads, bf16 autocast, data-loader workers)
RUNS = {
    "fp32, 1 thread": (1, False, 0),
    "fp32, 1 thread, again": (1, False, 0),
    "fp32, 2 threads": (2, False, 0),
    "fp32, 1 thread, 2 workers": (1, False, 2),
    "bf16, 1 thread": (1, True, 0),
    "bf16, 1 thread, again": (1, True, 0),
    "bf16, 2 threads": (2, True, 0),
}
PAIRS = [
    ("fp32, 1 thread", "fp32, 1 thread, again"),
    ("fp32, 1 thread", "fp32, 2 threads"),
    ("fp32, 1 thread", "fp32, 1 thread, 2 workers"),
    ("bf16, 1 thread", "bf16, 1 thread, again"),
    ("bf16, 1 thread", "bf16, 2 threads"),
    ("fp32, 1 thread", "bf16, 1 thread"),
]


def difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> str:
    largest = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    return "bitwise" if largest == 0 else f"{largest:.2g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        make_dataset(base / "derm", seed=1)
        make_dataset(base / "fundus", seed=2, shape=(40, 56))
        weights = {}
        for i, (label, (threads, bf16, workers)) in enumerate(RUNS.items()):
            out = str(base / f"run{i}")
            command = [sys.executable, "-c", RUN, str(base), out, str(threads), str(int(bf16)), str(workers)]
            subprocess.run(command, check=True, capture_output=True)
            weights[label] = torch.load(out + ".pt", weights_only=True)
    rows = [f"| {a} | {b} | {difference(weights[a], weights[b])} |" for a, b in PAIRS]
    lines = ["| run | against | max abs difference of the weights |", "|---|---|---:|", *rows]
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
