"""Shared ending of the benchmark scripts: print the result and, with --out, write it to a file."""

from __future__ import annotations

from pathlib import Path


def report(text: str, out: Path | None) -> None:
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
