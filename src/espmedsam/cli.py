"""The ``espmedsam`` command: one short function per verb, each calling one library function."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from espmedsam.errors import EspMedSAMError
from espmedsam.modalities import MODALITIES

console = Console(stderr=True)
_state = {"debug": False}


class _App(typer.Typer):
    """Typer app that turns library errors into ``error: <message>`` and the error's exit code."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except EspMedSAMError as error:
            if _state["debug"]:
                raise
            console.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
            sys.exit(error.exit_code)


app = _App(
    name="espmedsam",
    help="ESP-MedSAM: prompt-free segmentation of 2D medical images (six modalities).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
import_app = typer.Typer(help="Convert checkpoints from the field (official ESP-MedSAM, MobileSAM, SAM).")
app.add_typer(import_app, name="import")

CheckpointOpt = Annotated[
    Path | None, typer.Option("--checkpoint", "-c", help="Native .safetensors checkpoint (default: bundled).")
]


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
) -> None:
    _state["debug"] = debug
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


@app.command()
def info(
    checkpoint: CheckpointOpt = None,
    model: Annotated[str, typer.Option(help="Named configuration when no checkpoint is given.")] = "default",
) -> None:
    """Show the model configuration and its parameters by component."""
    from espmedsam.models.summary import SAM_VIT_B_PARAMETERS, parameter_counts, sam_ratio

    net = _load(checkpoint, model)
    cfg = net.config
    out = Console()
    out.print(
        f"[bold]model[/bold] {cfg.name}   input {cfg.image_size}²   modalities {', '.join(cfg.modalities)}"
    )
    out.print(f"normalisation (x - {list(cfg.pixel_mean)}) / {list(cfg.pixel_std)} on 0..255 RGB")
    enc = cfg.encoder
    out.print(
        f"encoder TinyViT dims {list(enc.embed_dims)} depths {list(enc.depths)} heads {list(enc.num_heads)} "
        f"windows {list(enc.window_sizes)}; "
        f"controllers {'1 shared' if cfg.controller.shared else len(cfg.modalities)}"
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
def predict(
    inputs: Annotated[
        list[str] | None,
        typer.Argument(
            help="Image files, folders or glob patterns (PNG, JPEG, TIFF, BMP); default: bundled examples."
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for masks and overlays.")] = Path(
        "predictions"
    ),
    modality: Annotated[
        str | None,
        typer.Option("--modality", "-m", help=f"One of {', '.join(MODALITIES)}; else from file names."),
    ] = None,
    checkpoint: CheckpointOpt = None,
    size: Annotated[int | None, typer.Option(help="Model input side (multiple of 32).")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, ...")] = "cpu",
    fp32: Annotated[bool, typer.Option("--fp32", help="Disable bfloat16 autocast.")] = False,
) -> None:
    """Segment images: writes <name>_mask.png (original size) and <name>_overlay.png per image."""
    from espmedsam.predict import EXAMPLES_DIR, Predictor, expand_inputs, predict_paths

    paths = expand_inputs(inputs or [str(EXAMPLES_DIR)])
    predictor = Predictor(_load(checkpoint, "default"), device=device, size=size, bfloat16=not fp32)
    with _progress() as progress:
        task = progress.add_task("predicting", total=len(paths))
        for result in predict_paths(predictor, paths, out, modality=modality):
            progress.advance(task)
            progress.console.print(
                f"{result.source.name} ({result.modality}): "
                f"{100 * result.foreground_fraction:.1f} % foreground"
                f" -> {result.mask_path}"
            )
    console.print(f"wrote {len(paths)} masks and overlays to {out}")


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
    from espmedsam.checkpoints.native import load_model

    target = load_model(into) if into else None
    model = import_official(checkpoint, modality=modality, into=target)
    console.print(f"wrote {model.save(out)} ({model.config.name} layout)")


@import_app.command("mobilesam")
def import_mobilesam_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="MobileSAM's mobile_sam.pt.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .safetensors file.")],
    into: Annotated[Path | None, typer.Option(help="Native checkpoint to load the weights into.")] = None,
) -> None:
    """Initialise the shared TinyViT (and SAM's decoder parts) from MobileSAM."""
    from espmedsam.checkpoints.importers import import_mobilesam
    from espmedsam.checkpoints.native import load_model

    model = import_mobilesam(checkpoint, into=load_model(into) if into else None)
    console.print(f"wrote {model.save(out)}")


@import_app.command("sam")
def import_sam_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="SAM ViT-B/L/H or MedSAM ViT-B checkpoint (.pth).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .safetensors file of the image encoder.")],
) -> None:
    """Import a SAM / MedSAM image encoder (the distillation teacher)."""
    from espmedsam.checkpoints.sam import import_sam, save_sam_encoder

    encoder = import_sam(checkpoint)
    console.print(f"wrote {save_sam_encoder(encoder, out)}")


def _load(checkpoint: Path | None, name: str):
    from espmedsam.checkpoints.native import default_checkpoint, load_model
    from espmedsam.models.registry import build_model

    path = checkpoint or (default_checkpoint() if name == "default" else None)
    if path is not None:
        return load_model(path)
    if name == "default":
        console.print("[yellow]warning:[/yellow] no trained weights bundled; using an untrained model")
    return build_model(name)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
    )
