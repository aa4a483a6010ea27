"""Bad and unusual inputs through every command: ``tests/hostile/corpus.py`` run through the CLI.

Usage: python benchmarks/hostile_inputs.py [--out benchmarks/results/hostile_inputs.md]

Each case is built in an empty folder and run in this process as ``espmedsam ...`` runs from a shell (an
escaping exception is printed as a traceback). The table gives what was expected, what came out (the exit
code and the last line of output, paths shortened) and whether every check of the case passed (exit code,
message, no traceback, no partial or temporary file, masks of the image's own size). Cases about file
permissions are skipped when run as root, where permissions do not bind (the EACCES cases simulate them).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import report

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "hostile"))
import corpus  # noqa: E402  # the corpus lives beside the tests that assert it


def commit() -> str:
    """The short commit hash, marked when the working tree has changes."""
    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root)
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=root)
    if head.returncode:
        return "unknown"
    return head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows, passed, skipped = [], 0, 0
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        shared = corpus.Shared(Path(work) / "shared")
        for index, item in enumerate(corpus.CASES):
            expected = item.expect.describe()
            if item.non_root and corpus.is_root():
                rows.append((item, expected, "skipped: running as root", "skipped"))
                skipped += 1
                continue
            folder = Path(work) / f"case{index:03d}"
            folder.mkdir()
            outcome = corpus.run_case(item, folder, shared)
            problems = corpus.check(item, outcome, folder)
            passed += not problems
            verdict = "yes" if not problems else "NO: " + "; ".join(problems)
            rows.append((item, expected, corpus.observed(outcome, folder, item.expect.says), verdict))
    seconds = time.perf_counter() - start
    run = len(rows) - skipped
    kinds = len({item.command.split()[0] for item in corpus.CASES})
    lines = [
        f"{len(rows)} kinds of bad or unusual input over {kinds} commands; commit {commit()}; "
        f"run as {'root' if corpus.is_root() else 'a user without root rights'}; {seconds:.0f} s in all.",
        "",
        f"**{passed} of {run} passed ({100 * passed / max(1, run):.1f} %)**"
        + (f"; {skipped} skipped (file permissions, running as root)." if skipped else "."),
        "",
        "| kind | command | expected | observed | pass |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {cell(item.kind)} | `{item.command}` | {cell(expected)} | {cell(seen)} | {cell(verdict)} |"
        for item, expected, seen, verdict in rows
    ]
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
