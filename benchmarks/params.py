"""Parameter counts by component, against SAM ViT-B and the official checkpoint.

Usage: python benchmarks/params.py [--out benchmarks/results/params.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _report import report

from espmedsam import build_model
from espmedsam.models.summary import SAM_VIT_B_PARAMETERS, parameter_counts, sam_ratio

OFFICIAL_CHECKPOINT_PARAMETERS = 12_789_587
OFFICIAL_UNUSED = 321_640 + 6_220  # TinyViT's ImageNet head + the prompt encoder's weights, never used


def table(name: str) -> list[str]:
    model = build_model(name)
    lines = [f"### `{name}` layout", "", "| component | parameters | % of SAM ViT-B |", "|---|---|---|"]
    for row in parameter_counts(model):
        lines.append(
            f"| {row.component} | {row.parameters:,} | {100 * row.parameters / SAM_VIT_B_PARAMETERS:.2f} |"
        )
    lines.append(f"\nTotal: {100 * sam_ratio(model):.2f} % of SAM ViT-B ({SAM_VIT_B_PARAMETERS:,}).\n")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    official = sum(p.numel() for p in build_model("official").parameters())
    lines = table("default") + table("litemedsam") + table("official")
    lines.append(
        f"Official layout: {official:,} parameters + {OFFICIAL_UNUSED:,} that the official checkpoint "
        "stores but never "
        f"uses (TinyViT ImageNet head 321,640, prompt encoder 6,220) = {official + OFFICIAL_UNUSED:,} "
        f"(official count {OFFICIAL_CHECKPOINT_PARAMETERS:,}: "
        f"{'match' if official + OFFICIAL_UNUSED == OFFICIAL_CHECKPOINT_PARAMETERS else 'MISMATCH'})."
    )
    text = "\n".join(lines)
    report(text, args.out)


if __name__ == "__main__":
    main()
