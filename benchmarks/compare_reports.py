"""Side-by-side table of `espmedsam evaluate` reports: one column per report, one row per dataset.

With ``--paired`` each later report is shown as its difference from the first, image by image
(``per_image.csv``): the mean difference and its standard error, so that a change of a few hard images
can be told from a change of the whole set.

Usage: python benchmarks/compare_reports.py LABEL=REPORT_DIR ... [--metric dice] [--paired] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from _report import per_image_scores, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", help="LABEL=REPORT_DIR (an evaluate report folder)")
    parser.add_argument("--metric", default="dice", choices=("dice", "iou", "hd95", "nsd"))
    parser.add_argument("--paired", action="store_true", help="later reports as differences from the first")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    labels, folders = map(list, zip(*(item.partition("=")[::2] for item in args.reports), strict=True))
    needed = "per_image.csv" if args.paired else "summary.json"
    for item, folder in zip(args.reports, folders, strict=True):
        if not (Path(folder) / needed).is_file():
            parser.error(f"{item!r} is not LABEL=REPORT_DIR with a {needed} (an espmedsam evaluate report)")
    if args.paired:
        report(paired_table(labels, [Path(f) for f in folders], args.metric), args.out)
        return
    summaries = [json.loads((Path(folder) / "summary.json").read_text()) for folder in folders]
    rows = [f"| dataset | {' | '.join(labels)} |", "|---|" + "---:|" * len(labels)]
    for name, entry in summaries[0]["datasets"].items():
        cells = [_cell(s["datasets"].get(name, {}).get(args.metric)) for s in summaries]
        rows.append(f"| {name} ({entry['modality']}) | {' | '.join(cells)} |")
    overall = [_cell(s["overall"][args.metric]) for s in summaries]
    rows.append(f"| **mean of dataset means** | {' | '.join(f'**{c}**' for c in overall)} |")
    report("\n".join(rows), args.out)


def paired_table(labels: list[str], folders: list[Path], metric: str) -> str:
    """Per dataset: the first report's mean, then each other's mean difference from it ± standard error,
    over the images both reports scored."""
    scores = [
        {name: dict(rows) for name, rows in per_image_scores(folder, metric).items()} for folder in folders
    ]
    rows = [f"| dataset | {labels[0]} | {' | '.join(f'{label} − {labels[0]}' for label in labels[1:])} |"]
    rows.append("|---|" + "---:|" * len(labels))
    for dataset, base in scores[0].items():
        cells = [f"{statistics.fmean(base.values()):.3f} (n={len(base)})"]
        cells += [_difference(base, other.get(dataset, {})) for other in scores[1:]]
        rows.append(f"| {dataset} | {' | '.join(cells)} |")
    return "\n".join(rows)


def _difference(base: dict[str, float], other: dict[str, float]) -> str:
    differences = [other[stem] - base[stem] for stem in base if stem in other]
    if len(differences) < 2:
        return "-"
    error = statistics.stdev(differences) / math.sqrt(len(differences))
    return f"{statistics.fmean(differences):+.4f} ± {error:.4f}"


def _cell(block: dict | None) -> str:
    if not block or block.get("mean") is None:
        return "-"
    return f"{block['mean']:.3f}"


if __name__ == "__main__":
    main()
