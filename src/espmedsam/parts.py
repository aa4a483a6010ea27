"""Spreading one ``predict`` over many processes or machines, as nnU-Net's ``-num_parts``/``-part_id``.

Part ``K`` of ``N`` takes every ``N``-th input starting at ``K`` of the sorted input list, so the parts
are disjoint, cover every input once and differ in size by one at most. Each part writes
``predictions.partKofN.csv`` beside the masks; ``merge_predictions`` joins them into the
``predictions.csv`` a single run would have written, in the same order.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from espmedsam.errors import InputError
from espmedsam.files import write_text

T = TypeVar("T")

_PART_NAME = re.compile(r"^predictions\.part(\d+)of(\d+)\.csv$")


def check_part(num_parts: int, part_id: int) -> None:
    """Raises ``InputError`` unless ``0 <= part_id < num_parts``."""
    if num_parts < 1:
        raise InputError(f"--num-parts must be 1 or more, got {num_parts}")
    if not 0 <= part_id < num_parts:
        raise InputError(
            f"--part-id must be from 0 to {num_parts - 1} for --num-parts {num_parts}, got {part_id}"
        )


def select_part(inputs: Sequence[T], num_parts: int, part_id: int) -> list[T]:
    """Part ``part_id`` of ``num_parts``: ``inputs[part_id::num_parts]`` (round robin, so that slow and
    fast inputs, which often sit together in a sorted folder, spread over the parts)."""
    check_part(num_parts, part_id)
    return list(inputs[part_id::num_parts])


def part_csv_name(num_parts: int, part_id: int) -> str:
    """``predictions.csv`` for a whole run, ``predictions.partKofN.csv`` for part K of N."""
    check_part(num_parts, part_id)
    return "predictions.csv" if num_parts == 1 else f"predictions.part{part_id}of{num_parts}.csv"


def merge_predictions(folder: str | Path, out: str | Path | None = None) -> tuple[Path, int]:
    """Join the parts' ``predictions.partKofN.csv`` files in ``folder`` into ``out`` (default:
    ``folder/predictions.csv``), rows in the order of one run over all inputs. Returns the file and its
    number of rows.

    Raises:
        InputError: no part files, parts of different ``N`` mixed, a part missing, or headers that differ.
    """
    folder = Path(folder)
    parts = _part_files(folder)
    header, tables = None, []
    for path in parts:
        with path.open(newline="") as handle:
            reader = csv.reader(handle)
            rows = list(reader)
        if not rows:
            raise InputError(f"{path}: empty (not a predictions CSV)")
        if header is not None and rows[0] != header:
            raise InputError(f"{path}: its columns differ from {parts[0].name}'s")
        header = rows[0]
        tables.append(rows[1:])
    merged = _interleave(tables)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(merged)
    target = write_text(Path(out) if out is not None else folder / "predictions.csv", buffer.getvalue())
    return target, len(merged)


def _part_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder")
    found = {}
    for path in folder.iterdir():
        match = _PART_NAME.match(path.name)
        if match:
            found[path] = (int(match[1]), int(match[2]))
    if not found:
        raise InputError(f"{folder}: no predictions.partKofN.csv files (predict --num-parts N --part-id K)")
    counts = {n for _, n in found.values()}
    if len(counts) > 1:
        raise InputError(
            f"{folder}: parts of different --num-parts mixed ({', '.join(map(str, sorted(counts)))})"
        )
    (num_parts,) = counts
    by_id = {k: path for path, (k, _) in found.items()}
    missing = [k for k in range(num_parts) if k not in by_id]
    if missing:
        raise InputError(f"{folder}: part(s) {', '.join(map(str, missing))} of {num_parts} missing")
    return [by_id[k] for k in range(num_parts)]


def _interleave(tables: list[list[list[str]]]) -> list[list[str]]:
    # part k holds inputs k, k+N, k+2N, ...: taking one row of each part in turn restores input order
    rows = []
    for index in range(max(len(t) for t in tables)):
        rows += [table[index] for table in tables if index < len(table)]
    return rows
