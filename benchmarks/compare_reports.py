"""Side-by-side table of `espmedsam evaluate` reports: one column per report, one row per dataset.

Usage: python benchmarks/compare_reports.py LABEL=REPORT_DIR ... [--metric dice] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _report import report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", help="LABEL=REPORT_DIR (a folder holding summary.json)")
    parser.add_argument("--metric", default="dice", choices=("dice", "iou", "hd95", "nsd"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    labels, summaries = [], []
    for item in args.reports:
        label, _, folder = item.partition("=")
        labels.append(label)
        summaries.append(json.loads((Path(folder) / "summary.json").read_text()))
    rows = [f"| dataset | {' | '.join(labels)} |", "|---|" + "---:|" * len(labels)]
    for name, entry in summaries[0]["datasets"].items():
        cells = [_cell(s["datasets"].get(name, {}).get(args.metric)) for s in summaries]
        rows.append(f"| {name} ({entry['modality']}) | {' | '.join(cells)} |")
    overall = [_cell(s["overall"][args.metric]) for s in summaries]
    rows.append(f"| **mean of dataset means** | {' | '.join(f'**{c}**' for c in overall)} |")
    report("\n".join(rows), args.out)


def _cell(block: dict | None) -> str:
    if not block or block.get("mean") is None:
        return "-"
    return f"{block['mean']:.3f}"


if __name__ == "__main__":
    main()
