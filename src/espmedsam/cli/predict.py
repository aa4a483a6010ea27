"""Prediction verbs: predict (files, folders, volumes, prompts, parts), predictions merge, evaluate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from espmedsam.cli.common import (
    BackendOpt,
    DeviceOpt,
    ModelFileOpt,
    RefineOpt,
    app,
    console,
    make_predictor,
    predictions_app,
    progress_bar,
)
from espmedsam.errors import InputError
from espmedsam.modalities import MODALITIES


@app.command()
def evaluate(
    data: Annotated[
        list[str], typer.Option("--data", "-d", help="Dataset folder DIR[:MODALITY]; repeat for several.")
    ],
    checkpoint: ModelFileOpt = None,
    backend: BackendOpt = "auto",
    split: Annotated[str, typer.Option(help="train, val, test, or all (every image).")] = "test",
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder.")] = Path("evaluation"),
    protocol: Annotated[
        str, typer.Option(help="native (original size, HD95) or paper (1024², Hausdorff 100th percentile).")
    ] = "native",
    overlays: Annotated[int, typer.Option(help="Overlays for the first N images of each dataset.")] = 8,
    size: Annotated[
        int | None,
        typer.Option(
            help="Model input side (multiple of 32, or 8 for LiteMedSAM's stem); default: per modality."
        ),
    ] = None,
    device: DeviceOpt = "auto",
    fp32: Annotated[
        bool, typer.Option("--fp32", help="Disable bfloat16 (torch autocast, OpenVINO's bf16).")
    ] = False,
    refine: RefineOpt = "none",
    workers: Annotated[
        int | None, typer.Option(help="Image-reading processes (default: 4 on a GPU, 0 on the CPU).")
    ] = None,
    worst: Annotated[
        int,
        typer.Option(
            min=0,
            help="Write worst_<dataset>.png per dataset: its K lowest-Dice images in a grid, prediction "
            "outlined red, ground truth green, captioned with file stem and Dice (0: none).",
            metavar="K",
        ),
    ] = 0,
) -> None:
    """Score a model on dataset folders: per-image CSV, summary (JSON and Markdown), overlays and, with
    --worst K, a montage of each dataset's K lowest-Dice images."""
    from rich.markup import escape

    from espmedsam.checkpoints.native import default_checkpoint
    from espmedsam.data.dataset import parse_dataset_arg
    from espmedsam.errors import DataError
    from espmedsam.evaluate import evaluate as evaluate_folders
    from espmedsam.files import check_output_folder

    sources = [parse_dataset_arg(item) for item in data]
    check_output_folder(out)
    predictor = make_predictor(checkpoint, backend, device, size, not fp32, 8, None, refine)
    with progress_bar() as progress:
        task = progress.add_task("evaluating", total=None)
        report = evaluate_folders(
            predictor,
            sources,
            split=None if split == "all" else split,
            out_dir=out,
            protocol=protocol,  # type: ignore[arg-type]  # checked by evaluate
            overlays=overlays,
            checkpoint=checkpoint or default_checkpoint() or "untrained",
            progress=lambda done, total: progress.update(task, completed=done, total=total),
            workers=workers,
            worst=worst,
        )
    Console().print(_summary_table(report.summary))
    names = [report.summary_json.name, report.summary_md.name, *(path.name for path in report.montages)]
    console.print(f"wrote {report.per_image_csv}, {', '.join(names)}")
    if report.failures:  # scored without them; listed in summary.json and summary.md too
        console.print(f"[red]{len(report.failures)} not scored:[/red]", highlight=False)
        for line in report.failures:
            console.print(f"  {escape(line)}", highlight=False, soft_wrap=True)
        total = len(report.rows) + len(report.failures)
        raise DataError(f"{len(report.failures)} of {total} images failed")


@app.command()
def predict(
    inputs: Annotated[
        list[str] | None,
        typer.Argument(
            help="Images (PNG, JPEG, TIFF, BMP, GIF; multi-page TIFF, animated GIF and APNG as stacks of "
            "pages), DICOM files or series folders (one input per series), NIfTI files, folders or globs; "
            "default: the bundled examples."
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for masks and overlays.")] = Path(
        "predictions"
    ),
    modality: Annotated[
        str,
        typer.Option(
            "--modality",
            "-m",
            help=f"auto (a file-name prefix such as xray_..., else the classifier) or one of "
            f"{', '.join(MODALITIES)}.",
        ),
    ] = "auto",
    checkpoint: ModelFileOpt = None,
    backend: BackendOpt = "auto",
    size: Annotated[
        int | None,
        typer.Option(
            help="Model input side (multiple of 32, or 8 for LiteMedSAM's stem); default: per modality."
        ),
    ] = None,
    axis: Annotated[int, typer.Option(help="NIfTI volumes: segment slice by slice along this axis.")] = 2,
    page: Annotated[
        int | None,
        typer.Option(
            help="Multi-page images: segment only this page, 0-based (--page 0 is the first), as a 2D image "
            "(<name>_page<N>_mask.png); default: every page, into one multi-page <name>_mask.tif.",
            min=0,
        ),
    ] = None,
    dicom_output: Annotated[
        str, typer.Option(help="Masks of DICOM inputs: nifti, or seg (DICOM-SEG, needs highdicom).")
    ] = "nifti",
    min_confidence: Annotated[
        float, typer.Option(help="Warn when the classifier's probability is below this.")
    ] = 0.6,
    skip_unknown: Annotated[
        bool,
        typer.Option(
            "--skip-unknown",
            help="--modality auto: write no mask for an image unlike every modality (it is flagged anyway).",
        ),
    ] = False,
    box: Annotated[
        list[str] | None,
        typer.Option(
            "--box",
            help="x0,y0,x1,y1 in the image's pixels: segment the object in this box with the promptable "
            "decoder (repeatable: one object each; one 2D input).",
        ),
    ] = None,
    point: Annotated[
        list[str] | None,
        typer.Option(
            "--point",
            help="x,y[,label] in the image's pixels, label 1 foreground (default) or 0 background "
            "(repeatable; one 2D input).",
        ),
    ] = None,
    prompts_file: Annotated[
        Path | None,
        typer.Option(
            "--prompts",
            help="CSV (image,kind,x0,y0,x1,y1,label) or JSON file of boxes and points per image file name; "
            "images it does not name are segmented prompt-free.",
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images of one input size per forward pass.")] = 8,
    threads: Annotated[
        int | None, typer.Option(help="CPU threads for the model (default: all cores).")
    ] = None,
    overlays: Annotated[bool, typer.Option(help="Write an overlay (2D) or a montage (volumes).")] = True,
    device: DeviceOpt = "auto",
    fp32: Annotated[
        bool, typer.Option("--fp32", help="Disable bfloat16 (torch autocast, OpenVINO's bf16).")
    ] = False,
    refine: RefineOpt = "none",
    num_parts: Annotated[
        int,
        typer.Option(
            "--num-parts",
            help="Spread the inputs over this many runs (machines or processes); see --part-id.",
        ),
    ] = 1,
    part_id: Annotated[
        int,
        typer.Option(
            "--part-id",
            help="This run's part, 0 to --num-parts - 1: every N-th input from the K-th, its table in "
            "predictions.partKofN.csv (espmedsam predictions merge joins them).",
        ),
    ] = 0,
) -> None:
    """Segment images and volumes: masks in the input's format (PNG, NIfTI; DICOM -> NIfTI or DICOM-SEG),
    an overlay or montage per file, and predictions.csv. --box, --point and --prompts correct masks with
    the promptable decoder."""
    from rich.markup import escape

    from espmedsam.errors import DataError
    from espmedsam.files import check_output_folder
    from espmedsam.parts import part_csv_name, select_part
    from espmedsam.predict import EXAMPLES_DIR
    from espmedsam.predict_files import PredictOptions, expand_inputs, predict_files

    csv_name = part_csv_name(num_parts, part_id)
    paths = select_part(expand_inputs(inputs or [str(EXAMPLES_DIR)]), num_parts, part_id)
    check_output_folder(out)  # also before an empty part writes its table: a file named --out is one line
    if not paths:
        console.print(f"part {part_id} of {num_parts}: no inputs (fewer inputs than parts)")
        _write_empty_part(out, csv_name)
        return
    prompts = _prompts(paths, box, point, prompts_file)
    predictor = make_predictor(checkpoint, backend, device, size, not fp32, batch_size, threads, refine)
    if prompts and getattr(predictor.model, "prompt_decoder", None) is None:
        raise InputError(
            "this checkpoint has no promptable decoder (espmedsam import litemedsam --into CKPT adds one)"
        )
    options = PredictOptions(
        modality=modality,
        min_confidence=min_confidence,
        skip_unknown=skip_unknown,
        axis=axis,
        page=page,
        dicom_format=dicom_output,
        overlays=overlays,
        prompts=prompts,
        csv_name=csv_name,
    )
    failures, skipped = [], 0
    with progress_bar() as progress:
        task = progress.add_task("predicting", total=len(paths))
        for result in predict_files(predictor, paths, out, options):
            progress.advance(task)
            if not result.ok:
                failures.append(result)
                if len(paths) > 1:  # one input: its error is the command's one line
                    message = escape(result.error or "")
                    progress.console.print(f"[red]failed[/red] {message}", highlight=False, soft_wrap=True)
                continue
            if result.known is False:
                line = _unknown_line(result, predictor.unknown_threshold)
                progress.console.print(line, highlight=False, soft_wrap=True)
            if not result.skipped:
                progress.console.print(_result_line(result), highlight=False, soft_wrap=True)
            skipped += result.skipped
    if failures and len(paths) == 1:
        raise DataError(failures[0].error or f"{paths[0]}: failed")
    done = len(paths) - len(failures) - skipped
    note = f"; skipped {skipped} unlike every modality" if skipped else ""
    console.print(f"wrote {done} of {len(paths)} inputs to {out} ({csv_name}){note}")
    if failures:
        console.print(f"[red]{len(failures)} failed:[/red]", highlight=False)
        for result in failures:
            console.print(f"  {escape(result.error or '')}", highlight=False, soft_wrap=True)
        raise DataError(f"{len(failures)} of {len(paths)} inputs failed")


def _write_empty_part(out: Path, csv_name: str) -> None:
    """A part with no inputs still writes its (header-only) table, so that merge sees every part."""
    from espmedsam.predict_files import write_csv

    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / csv_name, [])


@predictions_app.command("merge")
def predictions_merge(
    folder: Annotated[Path, typer.Argument(help="The output folder the parts wrote to.")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Merged table (default: FOLDER/predictions.csv).")
    ] = None,
) -> None:
    """Join the predictions.partKofN.csv tables of predict --num-parts N into one predictions.csv, rows
    in the order one run over every input would give."""
    from espmedsam.parts import merge_predictions

    target, rows = merge_predictions(folder, out)
    console.print(f"wrote {target}: {rows} rows")


def _prompts(paths, boxes: list[str] | None, points: list[str] | None, prompts_file: Path | None):
    """File name -> Prompts from --box/--point (one input) or --prompts; None without any.

    Raises:
        InputError: a malformed prompt, --box/--point with several inputs or with --prompts, or a prompt
            file naming no input.
    """
    from espmedsam.prompting import prompts_from_options, read_prompt_file

    if (boxes or points) and prompts_file is not None:
        raise InputError("give prompts either with --box/--point or in --prompts FILE, not both")
    if boxes or points:
        if len(paths) != 1:
            raise InputError(f"--box and --point apply to one image, got {len(paths)}: use --prompts FILE")
        return {_input_name(paths[0]): prompts_from_options(boxes, points)}
    if prompts_file is None:
        return None
    prompts = read_prompt_file(prompts_file)
    unknown = sorted(set(prompts) - {_input_name(p) for p in paths})
    if unknown:
        raise InputError(f"{prompts_file}: prompts for {', '.join(unknown[:5])}, which no input is named")
    return prompts


def _input_name(item) -> str:
    """An input's file name, as prompt files and predictions.csv name it (a DICOM series: none)."""
    return item.name if isinstance(item, Path) else ""


def _unknown_line(result, threshold: float | None) -> str:
    """One warning line for a file the classifier finds unlike every modality."""
    from rich.markup import escape

    then = (
        "skipped (--skip-unknown), no mask written" if result.skipped else f"segmented as {result.modality}"
    )
    return (
        f"[yellow]warning:[/yellow] {escape(result.source.name)} looks like none of the model's modalities "
        f"(distance {result.distance:.2f} > {threshold or 0:.2f}): {then}; pass --modality if it is one"
    )


def _result_line(result) -> str:
    from rich.markup import escape

    chosen = result.chosen_by
    if result.probability is not None:
        chosen = f"classifier p={result.probability:.2f}"
        if result.low_confidence:
            chosen += " [yellow]low confidence: check it, or pass --modality[/yellow]"
    area = f"{result.foreground_pixels} px"
    if result.foreground_mm2 is not None:
        area += f" = {result.foreground_mm2:.1f} mm²"
    frames = f", {result.frames} slices" if result.frames > 1 else ""
    if result.prompt_passes:
        frames += f", prompted: {result.prompt_passes} pass(es), predicted IoU {result.predicted_iou:.2f}"
    if result.predicted_dice is not None:
        frames += f", predicted Dice {result.predicted_dice:.2f}"
        frames += " [yellow]review it[/yellow]" if result.review else ""
    name, output = escape(result.source.name), escape(str(result.outputs[0]))
    return f"{name} ({result.modality}, {chosen}{frames}): {area} -> {output}"


def _summary_table(summary: dict) -> Table:
    from espmedsam.evaluate import format_mean_std

    hd = "HD100" if summary["hausdorff_percentile"] == 100.0 else "HD95"
    table = Table(
        title=f"{summary['protocol']} protocol, split {summary['split']} (mean ± std)",
        caption="datasets, modalities (bold; images pooled), overall = mean of dataset means",
    )
    for column in ("", "n", "Dice", "IoU", f"{hd} px", f"NSD@{summary['nsd_tolerance_px']:g}px"):
        table.add_column(column, justify="left" if not column else "right")
    groups = [(f"{name} ({entry['modality']})", entry) for name, entry in summary["datasets"].items()]
    groups += [(f"[bold]{name}[/bold]", entry) for name, entry in summary["modalities"].items()]
    overall = summary["overall"]
    groups += [("[bold]overall[/bold]", {**overall, "n": overall["n_datasets"]})]
    for label, entry in groups:
        metrics = [format_mean_std(entry[metric]) for metric in ("dice", "iou", "hd95", "nsd")]
        table.add_row(label, str(entry["n"]), *metrics)
    return table
