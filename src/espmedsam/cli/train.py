"""Training verbs: train, add-modality, distill, classifier train/stats, quality calibrate, prompts
train-clicks."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from espmedsam.cli.common import (
    DeviceOpt,
    DistillOutOpt,
    Fp16Opt,
    OverridesOpt,
    RecipeOpt,
    SamplesOpt,
    TeacherOpt,
    app,
    classifier_app,
    console,
    distill_app,
    is_main_process,
    progress_bar,
    prompts_app,
    quality_app,
)
from espmedsam.errors import InputError

# the teacher's mask KL is about a tenth of the label loss per pixel once a student is close: at 10 the
# two weigh about the same
DEFAULT_TEACHER_WEIGHT = 10.0


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
    teacher: Annotated[
        str | None,
        typer.Option(
            "--teacher",
            help="Also learn this checkpoint's masks (a path, or 'bundled'), so a pruned or otherwise "
            "changed copy keeps close to it where the labels alone would let it drift.",
        ),
    ] = None,
    teacher_weight: Annotated[
        float | None,
        typer.Option(
            "--teacher-weight",
            min=0.0,
            help="Weight of the teacher's term (mask KL) beside the label loss; with --teacher, "
            f"{DEFAULT_TEACHER_WEIGHT:g} when not given.",
        ),
    ] = None,
    teacher_focus: Annotated[
        float | None,
        typer.Option(
            "--teacher-focus",
            min=0.0,
            help="Weigh each image's teacher term by its disagreement to this power (e.g. 1), so the "
            "images whose masks part ways from the teacher's dominate; 0, the default, weighs all alike.",
        ),
    ] = None,
) -> None:
    """Train on dataset folders: best/last checkpoints, state.pt, log.jsonl and curves.png in out_dir."""
    import dataclasses

    from espmedsam.config import load_train_config
    from espmedsam.train import train as run_training

    cfg = load_train_config(config, overrides or [])
    cfg = dataclasses.replace(cfg, init=str(init)) if init else cfg
    cfg = dataclasses.replace(cfg, device=device) if device else cfg
    if teacher_weight is not None and not teacher:
        raise InputError("--teacher-weight weighs a teacher's term, so it needs --teacher")
    if teacher:
        weight = DEFAULT_TEACHER_WEIGHT if teacher_weight is None else teacher_weight
        cfg = dataclasses.replace(cfg, teacher=teacher, teacher_weight=weight)
    if teacher_focus is not None:
        if not cfg.teacher:
            raise InputError("--teacher-focus weighs a teacher's term, so it needs --teacher")
        cfg = dataclasses.replace(cfg, teacher_focus=teacher_focus)
    with _training_bar(cfg.total_steps) as show:
        result = run_training(cfg, resume=resume, progress=show)
    if is_main_process():  # under torchrun: one summary, rank 0's
        console.print(_training_summary(result))


@contextmanager
def _training_bar(total_steps: int | None):
    """A progress bar of training steps; yields the ``progress`` callback that updates it (and sets the
    total when it was not known), with ``.features`` for a second bar of encoder passes."""
    import datetime

    stats = TextColumn("{task.fields[stats]}")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), stats)
    with Progress(*columns, console=console, disable=not (console.is_terminal and is_main_process())) as bar:
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


DistillDataOpt = Annotated[
    list[str], typer.Option("--data", "-d", help="DIR[:MODALITY] dataset folder with train and val splits.")
]
SpeedUpOpt = Annotated[
    Path | None, typer.Argument(help="Checkpoint to speed up (default: the bundled weights).")
]
StepsOpt = Annotated[int, typer.Option(help="Most training steps (the cosine schedule's length).")]
BatchOpt = Annotated[int, typer.Option(help="Crops per step, modalities drawn equally often.")]
CropOpt = Annotated[int, typer.Option(help="Side of the random training crops (input pixels).")]
MaskWeightOpt = Annotated[
    float,
    typer.Option(
        min=0.0,
        help="Weight of the masks' agreement with the original's (KL divergence of the per-pixel mask "
        "probabilities, through the frozen decoders) beside the embedding error; 0 leaves the masks out.",
    ),
]
EvalEveryOpt = Annotated[int, typer.Option(help="Measure the held-out error every N steps.")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the batches and crops.")]


@distill_app.command("prefix")
def distill_prefix_command(
    data: DistillDataOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .safetensors (the faster checkpoint).")],
    checkpoint: SpeedUpOpt = None,
    minutes: Annotated[float, typer.Option(help="Training time budget.")] = 60.0,
    steps: StepsOpt = 2000,
    batch_size: BatchOpt = 8,
    crop: CropOpt = 192,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 5e-4,
    mask_weight: MaskWeightOpt = 0.0,
    max_per_dataset: Annotated[
        int | None, typer.Option(help="At most this many training images per dataset (the first ones).")
    ] = None,
    eval_every: EvalEveryOpt = 50,
    seed: SeedOpt = 0,
    student: Annotated[
        Path | None,
        typer.Option(
            help="Continue from this student (an earlier --out, or its OUT.prefix.safetensors with CKPT) "
            "instead of a fresh copy of CKPT."
        ),
    ] = None,
    fp16: Fp16Opt = False,
) -> None:
    """A faster checkpoint: the pointwise stem and stage 0 replaced by a 2x2 patch stem and stage 0 at a
    quarter of the positions (same output grid), distilled from the checkpoint itself. Only the stem and
    stage 0 learn, to reproduce the original's stage-0 tokens and image embeddings (and with
    --mask-weight its masks) on the train splits; the weights with the lowest error on the val splits
    are kept, and written to --out at each new low. Everything else is copied, so recalibrate the
    quality score (``quality calibrate``) on the result."""
    from espmedsam.checkpoints.native import load_model
    from espmedsam.distill.prefix import (
        cheaper_prefix_config,
        is_prefix_file,
        load_prefix,
        save_prefix,
        student_from,
    )

    _check_positive(steps=steps, batch_size=batch_size, eval_every=eval_every)
    path, teacher, sources = _teacher_and_sources(checkpoint, data)
    if student is None:
        fast = student_from(teacher)
    elif is_prefix_file(student):
        fast = load_prefix(student_from(teacher), student)
    else:
        fast = load_model(student)
    if fast.config != cheaper_prefix_config(teacher.config):
        raise InputError(f"{student}: not a cheaper-prefix student of {path}")
    with progress_bar() as progress:
        samples = _distill_samples(progress, teacher, sources, max_per_dataset)
        record = _distil_student(
            progress, fast, teacher, samples, out, fp16, None, steps=steps, minutes=minutes,
            batch_size=batch_size, crop=crop, lr=lr, mask_weight=mask_weight, eval_every=eval_every,
            seed=seed,
        )  # fmt: skip
    record = {"teacher": str(path), "continued_from": str(student) if student else None, **record}
    _save_with_log(fast, out, fp16, ".prefix.json", record)
    console.print(
        f"wrote {save_prefix(fast, out.with_suffix('.prefix.safetensors')).name} (stem and stage 0)"
    )


LEARNED = ("pruned", "decoders", "both")


@distill_app.command("prune")
def distill_prune_command(
    data: DistillDataOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .safetensors (the pruned checkpoint).")],
    checkpoint: SpeedUpOpt = None,
    mbconv_keep: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Fraction of stage 0's MBConv hidden channels kept.")
    ] = 0.5,
    mlp_keep: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Fraction of each attention block's MLP hidden channels.")
    ] = 0.75,
    calibration_per_dataset: Annotated[
        int, typer.Option(help="Training images per dataset whose activations the refit reproduces.")
    ] = 8,
    minutes: Annotated[float, typer.Option(help="Distillation time budget after pruning (0: none).")] = 0.0,
    steps: StepsOpt = 300,
    batch_size: BatchOpt = 8,
    crop: CropOpt = 192,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (low: the pruned model starts close).")] = (
        5e-5
    ),
    mask_weight: MaskWeightOpt = 1.0,
    eval_every: EvalEveryOpt = 20,
    seed: SeedOpt = 0,
    student: Annotated[
        Path | None,
        typer.Option(
            help="Continue from this pruned checkpoint (an earlier --out of CKPT) instead of pruning CKPT "
            "again; needs --minutes."
        ),
    ] = None,
    learn: Annotated[
        str,
        typer.Option(
            help="What learns with --minutes: pruned (the pruned layers), decoders (the controllers, "
            "refiner, SPPG and QDMD, so the masks follow CKPT's from the pruned embedding; needs "
            "--mask-weight above 0), or both.",
        ),
    ] = "pruned",
    fp16: Fp16Opt = False,
) -> None:
    """A faster checkpoint: stage 0's MBConvs and every attention block's MLP keep a fraction of their
    hidden channels, chosen by Optimal Brain Surgeon on the activations of a few training images per
    dataset, the output layers refitted by least squares to give the full layers' outputs. No gradient
    step is needed; with --minutes the pruned layers are then distilled from the checkpoint (embedding,
    stage-0 tokens and, with --mask-weight, masks), keeping the weights with the lowest error on the val
    splits. Recalibrate the quality score (``quality calibrate``) on the result."""
    from espmedsam.distill.prune import PruneWidths, decoding_parameters, pruned_parameters

    _check_positive(
        steps=steps,
        batch_size=batch_size,
        eval_every=eval_every,
        calibration_per_dataset=calibration_per_dataset,
    )
    if learn not in LEARNED:
        raise InputError(f"--learn must be one of {', '.join(LEARNED)}, got {learn!r}")
    if student and minutes <= 0:
        raise InputError("--student continues training, so it needs --minutes above 0")
    if learn != "pruned" and mask_weight <= 0:
        raise InputError("the decoders learn the masks, so --learn decoders|both needs --mask-weight above 0")
    path, teacher, sources = _teacher_and_sources(checkpoint, data)
    widths = PruneWidths(mbconv_keep, (mlp_keep,) * (len(teacher.config.encoder.embed_dims) - 1))
    with progress_bar() as progress:
        fast = _pruned_student(progress, teacher, sources, widths, calibration_per_dataset, student, path)
        params = (pruned_parameters(fast) if learn != "decoders" else []) + (
            decoding_parameters(fast) if learn != "pruned" else []
        )
        if minutes > 0:
            samples = _distill_samples(progress, teacher, sources, None)
        else:  # the pruned model as it is: its held-out error alone
            samples = {
                "train": [],
                "val": _prepared(progress, "reading the val images", teacher, sources, "val", 8),
            }
        record = _distil_student(
            progress, fast, teacher, samples, out, fp16, params, steps=steps if minutes > 0 else 0,
            minutes=minutes, batch_size=batch_size, crop=crop, lr=lr, mask_weight=mask_weight,
            eval_every=eval_every, seed=seed,
        )  # fmt: skip
    widths_record = dataclasses.asdict(widths) if student is None else None
    record = {"teacher": str(path), "continued_from": str(student) if student else None,
              "widths": widths_record, "learned": learn, **record}  # fmt: skip
    _save_with_log(fast, out, fp16, ".prune.json", record)


def _pruned_student(progress, teacher, sources, widths, calibration_per_dataset: int, student, path):
    """``student`` loaded (it must be a pruned copy of the teacher), or the teacher pruned to ``widths``
    on the calibration images."""
    from espmedsam.checkpoints.native import load_model
    from espmedsam.distill.prune import calibration_batches, collect_grams, is_pruned_from, pruned_model

    if student is not None:
        fast = load_model(student)
        if not is_pruned_from(fast, teacher):
            raise InputError(f"{student}: not a pruned copy of {path}")
        return fast
    calibration = _prepared(progress, "reading the calibration images", teacher, sources, "train",
                            calibration_per_dataset)  # fmt: skip
    task = progress.add_task("calibrating", total=len(calibration))
    grams = collect_grams(
        teacher, calibration_batches(calibration), progress=lambda n: progress.advance(task, n)
    )
    return pruned_model(teacher, grams, widths)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def _teacher_and_sources(checkpoint: Path | None, data: list[str]) -> tuple:
    """The checkpoint to speed up (the bundled one by default), loaded, and the dataset sources."""
    from espmedsam.checkpoints.native import default_checkpoint, load_model
    from espmedsam.data.dataset import parse_dataset_arg

    path = checkpoint or default_checkpoint()
    if path is None:
        raise InputError("no bundled weights; pass a CHECKPOINT")
    return path, load_model(path), [parse_dataset_arg(item) for item in data]


def _prepared(progress, description: str, teacher, sources, split: str, limit: int | None) -> list:
    """``prepare_prefix_samples`` of one split, with its bar."""
    from espmedsam.distill.prefix import prepare_prefix_samples

    task = progress.add_task(description, total=None)
    return prepare_prefix_samples(
        teacher, sources, split, max_per_dataset=limit, progress=lambda n: progress.advance(task, n)
    )


def _distill_samples(progress, teacher, sources, max_per_dataset: int | None) -> dict:
    """The train split (at most ``max_per_dataset`` per dataset) and eight val images per dataset."""
    return {
        "train": _prepared(progress, "reading the train images", teacher, sources, "train", max_per_dataset),
        "val": _prepared(progress, "reading the val images", teacher, sources, "val", 8),
    }


def _distil_student(progress, fast, teacher, samples: dict, out: Path, fp16: bool, params, **options) -> dict:
    """Distil ``fast`` from ``teacher`` (``distill_prefix``; ``params``: what learns, None: the prefix),
    writing it to ``out`` at each new held-out low; print the errors; the run's record. With
    ``steps`` 0, only the held-out error is measured."""
    import torch

    from espmedsam.checkpoints.native import save_model
    from espmedsam.distill.prefix import distill_prefix, held_out_error

    steps = options["steps"]
    if steps == 0:
        errors = held_out_error(fast, teacher, samples["val"], options["crop"])
        held_out, seconds, losses, best = [(0, *errors)], 0.0, [], (0, *errors)
    else:
        task = progress.add_task("distilling", total=steps)

        def show(row) -> None:
            progress.update(task, completed=row.step, description=f"distilling, loss {row.loss:.4f}")

        history = distill_prefix(
            fast, teacher, samples["train"], samples["val"], progress=show, params=params,
            on_best=lambda best: save_model(best, out, dtype=torch.float16 if fp16 else None), **options,
        )  # fmt: skip
        held_out, seconds, losses, best = history.held_out, history.seconds, history.losses, history.best
    first = held_out[0]
    console.print(
        f"{len(samples['train'])} train and {len(samples['val'])} held-out images; "
        f"{len(losses)} steps in {seconds / 60:.1f} min; held-out embedding error "
        f"(MSE / variance) {first[2]:.4f} at the start -> {best[2]:.4f} (step {best[0]}); "
        f"stage-0 tokens {first[1]:.4f} -> {best[1]:.4f}; mask divergence {first[3]:.4f} -> {best[3]:.4f}"
    )
    rows = [{"step": s, "tokens": t, "embedding": e, "masks": m} for s, t, e, m in held_out]
    return {"steps": len(losses), "minutes": round(seconds / 60, 2), "mask_weight": options["mask_weight"],
            "best_step": best[0], "held_out": rows, "losses": losses}  # fmt: skip


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
    with progress_bar() as progress:
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
    with progress_bar() as progress:
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
    refine_min_gain: Annotated[
        float,
        typer.Option(help="--refine self is used on a modality when it raised its mean val Dice by this."),
    ] = 0.005,
    fp16: Fp16Opt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Fit the quality score (each prompt-free mask's predicted Dice, in predictions.csv, evaluate's
    per_image.csv, the API and the page) on validation splits: every image is segmented and its score
    fitted to its true Dice; and choose the modalities where --refine self (boxes around the model's own
    mask through the promptable decoder) raises the validation Dice. The segmentation weights are copied
    unchanged; redo it whenever they change."""
    import dataclasses

    import torch

    from espmedsam.checkpoints.native import load_model, save_model
    from espmedsam.data.dataset import parse_dataset_arg
    from espmedsam.metrics import agreement
    from espmedsam.predict import Predictor
    from espmedsam.train.quality import (
        chosen_for_refinement,
        collect_samples,
        fit_quality,
        refine_gains,
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
    with progress_bar() as progress:
        task = progress.add_task(f"{split} masks", total=None)

        def track(items):
            items = list(items)
            progress.update(task, total=len(items))
            for item in items:
                yield item
                progress.advance(task)

        samples = collect_samples(predictor, sources, split, track)
    fit_quality(model.quality, samples)
    gains = refine_gains(samples, model.modalities)
    refined = chosen_for_refinement(gains, refine_min_gain)
    quality_config = dataclasses.replace(model.config.quality, refine_modalities=refined)
    model.config = dataclasses.replace(model.config, quality=quality_config)
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
    table = Table(title=f"--refine self on the {split} splits (chosen: gain >= {refine_min_gain:g})")
    for column in ("modality", "images", "prompt-free Dice", "self-prompted Dice", "gain", "chosen"):
        table.add_column(column, justify="left" if column == "modality" else "right")
    for g in gains:
        chosen = "yes" if g.modality in refined else "no"
        cells = (f"{g.prompt_free:.4f}", f"{g.refined:.4f}", f"{g.gain:+.4f}", chosen)
        table.add_row(g.modality, str(g.images), *cells)
    console.print(table)
    path = save_model(model, out, dtype=torch.float16 if fp16 else None)
    console.print(f"wrote {path}")


@prompts_app.command("train-clicks")
def prompts_train_clicks(
    checkpoint: Annotated[
        Path, typer.Argument(help="ESP-MedSAM .safetensors checkpoint with a promptable decoder.")
    ],
    data: Annotated[
        list[str],
        typer.Option("--data", "-d", help="DIR[:MODALITY] dataset folder with train and val splits."),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output .safetensors (the checkpoint + click decoder).")
    ],
    minutes: Annotated[
        float, typer.Option(help="Training time budget (the embedding pass not counted).")
    ] = 30.0,
    steps: Annotated[int, typer.Option(help="Most training steps (the cosine schedule's length).")] = 1500,
    batch_size: Annotated[int, typer.Option(help="Images per step, all of one input size.")] = 8,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-4,
    max_clicks: Annotated[
        int, typer.Option(help="Clicks per simulated correction (1..N drawn per step).")
    ] = 3,
    max_per_dataset: Annotated[
        int | None, typer.Option(help="At most this many training images per dataset (the first ones).")
    ] = None,
    val_every: Annotated[int, typer.Option(help="Validate (and keep the best weights) every N steps.")] = 100,
    random_clicks: Annotated[
        float,
        typer.Option(
            help="Share of training clicks on a random pixel of the error region (else its centre)."
        ),
    ] = 0.5,
    select_after: Annotated[
        int | None,
        typer.Option(help="Keep the weights with the best val Dice after this many clicks (default: all)."),
    ] = None,
    shifted_masks: Annotated[
        float,
        typer.Option(
            help="Share of training corrections whose prompt-free logits are first shifted by a random "
            "offset (masks that miss or spill over more than on the training images)."
        ),
    ] = 0.0,
    max_shift: Annotated[float, typer.Option(help="Largest logit offset of --shifted-masks.")] = 4.0,
    seed: Annotated[int, typer.Option(help="Seed of the batches and the random clicks.")] = 0,
    refit_min_gain: RefitMinGainOpt = 0.005,
    keep_samples: KeepSamplesOpt = True,
    fp16: Fp16Opt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Train a click decoder, so that clicks alone correct a prompt-free mask: each click, with the
    clicks before it and the mask so far, is one pass of a copy of the promptable decoder that also reads
    the mask. Trained with simulated clicks (the centre of the largest error region) on the train splits;
    the weights with the best validation Dice after --max-clicks clicks (or --select-after) are kept.
    Everything else is copied unchanged, so prompt-free masks, boxes and the quality score stay as they
    are. At the end it chooses where to refit a clicked object from its box (as calibrate-clicks)."""

    from espmedsam.checkpoints.native import load_model
    from espmedsam.data.dataset import parse_dataset_arg
    from espmedsam.device import resolve_device
    from espmedsam.train.clicks import train_clicks, with_click_decoder

    for name, value in (("--steps", steps), ("--batch-size", batch_size), ("--max-clicks", max_clicks),
                        ("--val-every", val_every)):  # fmt: skip
        if value < 1:
            raise InputError(f"{name} must be at least 1, got {value}")
    for name, share in (("--random-clicks", random_clicks), ("--shifted-masks", shifted_masks)):
        if not 0 <= share <= 1:
            raise InputError(f"{name} must lie in [0, 1], got {share}")
    if max_shift < 0:
        raise InputError(f"--max-shift must be at least 0, got {max_shift}")
    if select_after is not None and not 1 <= select_after <= max_clicks:
        raise InputError(f"--select-after must lie in 1..{max_clicks}, got {select_after}")
    sources = [parse_dataset_arg(item) for item in data]
    target = resolve_device(device)
    model = with_click_decoder(load_model(checkpoint).to(target))
    model.requires_grad_(False)
    model.click_decoder.requires_grad_(True)
    with progress_bar() as progress:
        samples = _samples_by_split(
            progress, "embedding", max_per_dataset, None,
            _click_sample_reader(model, sources, keep_samples),
        )  # fmt: skip
        task = progress.add_task("training", total=steps)

        def show(step: int, row: dict) -> None:
            progress.update(task, completed=step, description=f"training, loss {row['loss']:.3f}")

        result = train_clicks(
            model, samples["train"], samples["val"], steps=steps, minutes=minutes, batch_size=batch_size,
            lr=lr, max_clicks=max_clicks, val_every=val_every, seed=seed, progress=show,
            random_share=random_clicks, select_after=select_after, shifted_share=shifted_masks,
            max_shift=max_shift,
        )  # fmt: skip
    first = result.history[0]["dice"]
    table = Table(
        title=f"val Dice after 0..{max_clicks} clicks (best step {result.best_step} of {result.steps})"
    )
    table.add_column("dataset")
    for k in range(max_clicks + 1):
        table.add_column(f"{k} click{'s' * (k != 1)}", justify="right")
    for name, values in result.best.per_dataset.items():
        table.add_row(name, *(f"{v:.4f}" for v in values))
    table.add_row("mean", *(f"{v:.4f}" for v in result.best.mean))
    console.print(table)
    console.print(
        f"{len(samples['train'])} train and {len(samples['val'])} val images; {result.steps} steps in "
        f"{result.seconds / 60:.1f} min; mean val Dice after {max_clicks} clicks "
        f"{first[-1]:.4f} (at the start) -> {result.best.mean[-1]:.4f}"
    )
    record = {"steps": result.steps, "minutes": round(result.seconds / 60, 2), "best_step": result.best_step}
    record["refit_clicked"] = _choose_refit(model, samples["val"], refit_min_gain)
    _save_with_log(model, out, fp16, ".clicks.json", {**record, "history": result.history})


KeepSamplesOpt = Annotated[
    bool,
    typer.Option(
        "--keep-samples/--no-keep-samples",
        help="Keep each embedded image with its prompt-free mask under ~/.cache/espmedsam/click-samples "
        "(about 2 MB an image), so later runs on the same weights skip the embedding pass.",
    ),
]


def _click_sample_reader(model, sources, keep: bool):
    """``read(split, limit, advance)`` -> the click samples of ``split``: read from the sample cache where
    kept, else embedded (from the frozen prefix's cached features where ``espmedsam train`` left them).
    The weights are fingerprinted and the prefix cache looked up once, for every split."""
    from espmedsam.train.clicks import ClickSampleCache, find_prefix_cache, prepare_samples

    cache = ClickSampleCache.for_model(model) if keep else None
    prefix = find_prefix_cache(model)
    return lambda split, limit, advance: prepare_samples(
        model, sources, split, max_per_dataset=limit, prefix=prefix, cache=cache, progress=advance
    )


RefitMinGainOpt = Annotated[
    float,
    typer.Option(
        help="Redraw each clicked object from its box on a modality when that raised its mean val Dice "
        "after 1, 2 and 3 clicks by this, on average."
    ),
]


@prompts_app.command("calibrate-clicks")
def prompts_calibrate_clicks(
    checkpoint: Annotated[
        Path, typer.Argument(help="ESP-MedSAM .safetensors checkpoint with a click decoder.")
    ],
    data: Annotated[
        list[str],
        typer.Option("--data", "-d", help="DIR[:MODALITY] dataset folder with a validation split."),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output .safetensors (the checkpoint, recalibrated).")
    ],
    split: Annotated[str, typer.Option(help="Split to choose on (never the test split).")] = "val",
    min_gain: RefitMinGainOpt = 0.005,
    keep_samples: KeepSamplesOpt = True,
    fp16: Fp16Opt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Choose the modalities where, after a foreground click, the object the click decoder corrected is
    decoded again from its bounding box by the box decoder (which redraws a boundary a click grew past):
    those where it raises the mean Dice after the benchmark's clicks (1, 2 and 3 clicks, each at the centre
    of the largest error region, averaged) on the validation splits. train-clicks does this at its end;
    redo it whenever the weights change. The weights are copied unchanged."""
    import torch

    from espmedsam.checkpoints.native import load_model, save_model
    from espmedsam.data.dataset import parse_dataset_arg
    from espmedsam.device import resolve_device

    if split == "test":
        raise InputError("calibrate on a validation split; the test split is for measuring")
    model = load_model(checkpoint).to(resolve_device(device)).eval()
    if model.click_decoder is None:
        raise InputError(f"{checkpoint} has no click decoder (espmedsam prompts train-clicks adds one)")
    sources = [parse_dataset_arg(item) for item in data]
    with progress_bar() as progress:
        task = progress.add_task(f"embedding the {split} images", total=None)
        read = _click_sample_reader(model, sources, keep_samples)
        samples = read(split, None, lambda n: progress.advance(task, n))
    _choose_refit(model, samples, min_gain)
    path = save_model(model, out, dtype=torch.float16 if fp16 else None)
    console.print(f"wrote {path}")


def _choose_refit(model, samples, min_gain: float) -> list[str]:
    """Set ``config.prompt.refit_clicked`` to the modalities where refitting each clicked object raised the
    samples' mean Dice after 1, 2 and 3 clicks by ``min_gain`` on average; print the table it was chosen
    by."""
    import dataclasses

    from espmedsam.train.clicks import refit_gains
    from espmedsam.train.quality import chosen_for_refinement

    gains = refit_gains(model, samples)
    chosen = chosen_for_refinement(gains, min_gain)
    prompt = dataclasses.replace(model.config.prompt, refit_clicked=chosen)
    model.config = dataclasses.replace(model.config, prompt=prompt)
    table = Table(
        title=f"each clicked object redrawn from its box: the val Dice it adds after 1..N clicks (chosen: "
        f"mean >= {min_gain:g})"
    )
    clicks = len(gains[0].clicked) if gains else 0
    after = [f"{k} click{'s' * (k > 1)}" for k in range(1, clicks + 1)]
    for column in ("modality", "images", *after, "mean", "on"):
        table.add_column(column, justify="left" if column == "modality" else "right")
    for g in gains:
        cells = [f"{b - a:+.4f}" for a, b in zip(g.clicked, g.refit, strict=True)]
        table.add_row(
            g.modality, str(g.images), *cells, f"{g.gain:+.4f}", "yes" if g.modality in chosen else "no"
        )
    console.print(table)
    return list(chosen)


def _samples_by_split(progress, verb: str, train_limit: int | None, val_limit: int | None, prepare) -> dict:
    """``{"train": ..., "val": ...}`` from ``prepare(split, limit, advance)``, each split with its bar."""
    samples = {}
    for split, limit in (("train", train_limit), ("val", val_limit)):
        task = progress.add_task(f"{verb} the {split} images", total=None)
        samples[split] = prepare(split, limit, lambda n, t=task: progress.advance(t, n))
    return samples


def _save_with_log(model, out: Path, fp16: bool, suffix: str, record: dict) -> None:
    """Write the checkpoint and, beside it under ``suffix``, the run's JSON record."""
    import json

    import torch

    from espmedsam.checkpoints.native import save_model

    path = save_model(model, out, dtype=torch.float16 if fp16 else None)
    log = path.with_suffix(suffix)
    log.write_text(json.dumps(record, indent=1))
    console.print(f"wrote {path} and {log.name}")


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
    with progress_bar() as progress:
        task = progress.add_task("teacher embeddings", total=None)
        epoch = [0]

        def show(p) -> None:
            if p.phase == "train" and p.done == 1:
                epoch[0] += 1
            label = "teacher embeddings" if p.phase == "cache" else f"epoch {epoch[0]}/{cfg.epochs}"
            loss = "" if p.loss is None else f" mse {p.loss:.4f}"
            progress.update(task, description=f"{label}{loss}", completed=p.done, total=p.total)

        result = distill(student, teacher, images, cfg, stage=stage, progress=show)
    if not is_main_process():  # under torchrun rank 0 reports
        return
    first, last = result.records[0], result.records[-1]
    if "held_out_mse" in first:
        console.print(
            f"held-out MSE {first['held_out_mse']:.4f} -> {last['held_out_mse']:.4f}, "
            f"cosine {first['held_out_cosine']:.3f} -> {last['held_out_cosine']:.3f}"
        )
    console.print(f"teacher embedded {result.teacher_images} inputs; wrote {result.student_path}")
