"""Dataset folders: data check, data import."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from espmedsam.cli.common import (
    console,
    data_app,
)


@data_app.command("check")
def data_check(
    folders: Annotated[list[Path], typer.Argument(help="Dataset folders to validate.")],
    limit: Annotated[int, typer.Option(help="Problems listed per dataset.")] = 50,
) -> None:
    """Validate dataset folders (pairs, sizes, binary masks, split); exit code 3 if any has an error."""
    from espmedsam.data.check import check_dataset
    from espmedsam.errors import DataError

    reports = [check_dataset(folder) for folder in folders]
    for report in reports:
        _print_dataset_report(report, limit)
    if any(report.errors for report in reports):
        raise typer.Exit(DataError.exit_code)


@data_app.command("import")
def data_import(
    src: Annotated[Path, typer.Argument(help="The public dataset as unpacked.")],
    dst: Annotated[Path, typer.Argument(help="Output folder (new or empty).")],
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="Source layout: nnunet, isic, kvasir, drive, dsb2018, busi.")
    ],
    max_side: Annotated[int | None, typer.Option(help="Shrink pairs whose longer side exceeds N px.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random split.")] = 0,
    skip_normal: Annotated[bool, typer.Option("--skip-normal", help="BUSI: leave out 'normal'.")] = False,
) -> None:
    """Convert a public dataset layout into a dataset folder (images/, masks/, split.json, SOURCE.md)."""
    from espmedsam.data.convert import convert_dataset

    report = convert_dataset(fmt, src, dst, max_side=max_side, seed=seed, skip_normal=skip_normal)
    counts = " / ".join(f"{name} {count}" for name, count in report.splits.items())
    console.print(f"wrote {report.root} ({counts})")
    if report.skipped:
        console.print(f"[yellow]warning:[/yellow] skipped {len(report.skipped)} items (listed in SOURCE.md)")


def _print_dataset_report(report, limit: int) -> None:
    from rich.markup import escape

    out = Console()
    out.print(f"[bold]{escape(str(report.root))}[/bold]: {report.pairs} pairs", soft_wrap=True)
    table = Table()
    table.add_column("split")
    table.add_column("stems", justify="right")
    for name, count in report.splits.items():
        table.add_row(name, str(count))
    out.print(table)
    for problem in report.problems[:limit]:
        colour = "red" if problem.severity == "error" else "yellow"
        item, message = escape(problem.item), escape(problem.message)
        out.print(f"[{colour}]{problem.severity}[/{colour}] {item}: {message}", soft_wrap=True)
    if len(report.problems) > limit:
        out.print(f"... and {len(report.problems) - limit} more")
    out.print(f"{len(report.errors)} errors, {len(report.warnings)} warnings", highlight=False)
