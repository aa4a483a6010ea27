"""MMDKD: multi-modal decoupled knowledge distillation (paper-notes §5).

Two stages, each an MSE between the student's and the teacher's (256, S/16, S/16) image embeddings:

- ``common``: the shared TinyViT (no controller active) learns from a SAM ViT on any images.
- ``modality``: for each modality k, only controller k learns, from a medical teacher, on modality-k
  images; the shared weights and every other controller stay bitwise unchanged (the rest of the model is
  frozen and kept in eval mode, so not even batch-norm statistics move).

Teacher embeddings come from an :class:`EmbeddingCache` (computed once per image and variant) or, with
``use_cache: false``, from the teacher in every step as in the official script.

Under ``torchrun`` (see ``train.distributed``) the ranks share the teacher's cache work, then each step's
batch (``batch_size`` stays the global batch) is split across them under DistributedDataParallel, with
batch norm statistics spanning the shares; held-out scores are reduced over the ranks, and rank 0 alone
writes ``student.safetensors``, ``log.jsonl`` and ``curves.png``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from espmedsam.checkpoints.native import save_model
from espmedsam.config import IMAGENET_MEAN, IMAGENET_STD, DistillConfig
from espmedsam.device import resolve_device
from espmedsam.distill.cache import CacheKey, EmbeddingCache, fill
from espmedsam.distill.images import DistillImage, InputStore, hold_out, unique
from espmedsam.distill.teacher import fingerprint
from espmedsam.errors import InputError
from espmedsam.models.espmedsam import ESPMedSAM
from espmedsam.normalisation import normalise
from espmedsam.train import distributed
from espmedsam.train.history import History
from espmedsam.train.sync_batchnorm import sync_batchnorm

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "espmedsam" / "teacher-embeddings"
Targets = Callable[[Sequence[DistillImage], Sequence[int], torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DistillProgress:
    """What the progress callback receives: ``phase`` is "cache" (teacher embeddings) or "train"."""

    phase: str
    done: int
    total: int
    loss: float | None = None


@dataclass(frozen=True)
class DistillResult:
    student_path: Path
    records: list[dict[str, Any]]  # one per epoch (epoch 0: before training)
    teacher_images: int  # images the teacher embedded in this run
    epoch_seconds: list[float]  # wall time of each training epoch (targets included)


def distill(
    student: ESPMedSAM,
    teacher: nn.Module,
    images: Sequence[DistillImage],
    config: DistillConfig,
    *,
    stage: str,
    progress: Callable[[DistillProgress], None] | None = None,
) -> DistillResult:
    """Run one MMDKD stage; writes ``student.safetensors`` (after every epoch), ``log.jsonl`` and
    ``curves.png`` to ``config.out_dir`` (default ``runs/distill_<stage>``).

    Args:
        student: the ESP-MedSAM model; trained in place, handed back in eval mode with gradients on.
        teacher: SAM-architecture image encoder, (B, 3, S, S) -> (B, 256, S/16, S/16).
        images: the images; in the ``modality`` stage each carries its modality. Repeated images (same
            content and modality) count once.
        stage: ``common`` or ``modality``.
    Raises:
        InputError: no images, an unknown stage, images without modality in the modality stage, or a
            teacher whose embedding width differs from the student's.
    """
    if stage == "common":  # no controller is active in the common stage, whatever folder an image is from
        images = [dataclasses.replace(image, modality=None) for image in images]
    images = unique(images)
    if not images:
        raise InputError("no images to distil on")
    resolve_device(config.device)  # an unknown device fails before anything else
    check_teacher_fits(teacher, student)
    with distributed.process_group(config.device) as device:
        config = dataclasses.replace(config, device=str(device))
        student.to(config.device)
        unsync = sync_batchnorm(student) if distributed.is_distributed() else None
        try:
            trainable = freeze_for_stage(student, stage, {image.modality for image in images})
            return _run(student, teacher, images, config, stage, trainable, progress)
        finally:
            if unsync is not None:
                unsync()  # the student goes back with plain BatchNorm2d modules
            student.eval().requires_grad_(True)  # as ``build_model`` gives it, also after an error


def _run(
    student: ESPMedSAM,
    teacher: nn.Module,
    images: list[DistillImage],
    config: DistillConfig,
    stage: str,
    trainable: list[nn.Parameter],
    progress: Callable[[DistillProgress], None] | None,
) -> DistillResult:
    torch.manual_seed(config.seed)
    train_set, held_out = hold_out(images, config.held_out, config.seed)
    counting = _CountingTeacher(teacher.to(config.device), student, config)
    inputs = InputStore(student.preprocess, config.image_size, config.input_memory_mb * 2**20)
    targets = _targets(counting, inputs, config, train_set, held_out, progress)
    out_dir = Path(config.out_dir or f"runs/distill_{stage}")
    history = History(out_dir / "log.jsonl") if distributed.is_main() else None  # rank 0 writes
    records: list[dict[str, Any]] = []

    def log(record: dict[str, Any]) -> None:
        records.append(record)
        if history is not None:
            history.append(record)

    optimizer = torch.optim.Adam(trainable, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config.lr_decay)
    # unused parameters: the modality stage trains one controller per step, and a rank whose share of a
    # small batch is a zero-image input gets no gradient for some parameters (the common stage's batches
    # are full but for the last, of len(train_set) % batch_size images)
    last = len(train_set) % config.batch_size or config.batch_size
    unused = stage == "modality" or last < distributed.world_size()
    encoder, device = _StudentEncoder(student), torch.device(config.device)
    encode = distributed.data_parallel(encoder, device, unused_parameters=unused)
    rng = random.Random(config.seed)  # the same draws on every rank: batches and variants agree
    log({"epoch": 0, **held_out_scores(student, held_out, inputs, targets, config)})
    seconds = []
    for epoch in range(1, config.epochs + 1):
        start = time.perf_counter()
        loss = train_epoch(
            student, stage, train_set, inputs, targets, optimizer, config, rng, progress, encode=encode
        )
        seconds.append(time.perf_counter() - start)
        schedule.step()
        scores = held_out_scores(student, held_out, inputs, targets, config)
        log({"epoch": epoch, "train_mse": loss, "epoch_s": seconds[-1], **scores})
        if history is not None:
            save_model(student, out_dir / "student.safetensors")
            plot_curves(records, out_dir / "curves.png")
    embedded = int(distributed.all_reduce_sum(torch.tensor(counting.images)))  # every rank's share
    distributed.barrier()  # every rank returns once rank 0's files are written
    return DistillResult(out_dir / "student.safetensors", records, embedded, seconds)


def check_teacher_fits(teacher: nn.Module, student: ESPMedSAM) -> None:
    """Raise InputError when the teacher's embedding width differs from the student's (checked before any
    teacher work: at 1024² filling the cache takes hours)."""
    teacher_width = getattr(getattr(teacher, "config", None), "out_chans", None)
    student_width = student.config.encoder.out_chans
    if teacher_width is not None and teacher_width != student_width:
        raise InputError(
            f"the teacher's embeddings have {teacher_width} channels, the student's {student_width}; "
            "the teacher must be a SAM ViT image encoder (256 channels) for the default student"
        )


def teacher_input(x: torch.Tensor, student: ESPMedSAM, mode: str) -> torch.Tensor:
    """Student inputs (B, 3, S, S) -> the teacher's: SAM's (raw - mean) / std, or MedSAM's per-image
    min-max scaling of the raw 0..255 RGB to [0, 1] (MedSAM feeds its encoder that way).

    Padded pixels hold the student's pixel mean in raw units, in either mode (0 for a min-max student).
    """
    mean, std = student.pixel_mean.to(x.device), student.pixel_std.to(x.device)
    sam_mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    sam_std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    mean_std = student.config.input_normalisation == "mean_std"
    if mode == "sam" and mean_std and torch.equal(mean, sam_mean) and torch.equal(std, sam_std):
        return x  # the default student already sees SAM's input
    # a min-max student input is the raw image up to its own scale: 0..1 read as 0..255
    raw = x * 255 if student.config.input_normalisation == "minmax" else x * std + mean
    if mode == "sam":
        return normalise(raw, "mean_std", sam_mean, sam_std)
    return normalise(raw, "minmax", sam_mean, sam_std)


def cache_folder_name(teacher: nn.Module, student: ESPMedSAM, config: DistillConfig) -> str:
    """The cache folder of a teacher's embeddings: its weights' fingerprint, how its input is normalised,
    its precision, and the student's padding value (its pixel mean, or its input normalisation's 0), which
    the teacher sees."""
    padding = student.pixel_mean.flatten().tolist()
    # a new setting gets its own name; mean_std caches keep the names they had
    if student.config.input_normalisation != "mean_std":
        padding = [student.config.input_normalisation, *padding]
    setting = repr((config.teacher_input, config.teacher_bf16, padding))
    return f"{fingerprint(teacher)}-{config.teacher_input}-{hashlib.sha256(setting.encode()).hexdigest()[:8]}"


def freeze_for_stage(student: ESPMedSAM, stage: str, modalities: set[str | None]) -> list[nn.Parameter]:
    """Set ``requires_grad`` for the stage and return the trainable parameters.

    ``common``: the shared TinyViT without its controllers (train mode, as MobileSAM's distillation).
    ``modality``: the controllers of ``modalities`` only (whole model in eval mode).
    """
    if stage == "common":
        names = {f"image_encoder.{n}" for n, _ in student.image_encoder.named_parameters()}
        names = {n for n in names if ".controllers." not in n}
        student.eval().image_encoder.train()
    elif stage == "modality":
        if None in modalities:
            raise InputError("the modality stage needs every image's modality (DIR:MODALITY)")
        slots = {controller_slot(student, m) for m in modalities if m is not None}
        names = {n for n, _ in student.named_parameters() if any(f".controllers.{k}." in n for k in slots)}
        student.eval()
    else:
        raise InputError(f"stage must be common or modality, got {stage!r}")
    trainable = []
    for name, parameter in student.named_parameters():
        parameter.requires_grad_(name in names)
        if name in names:
            trainable.append(parameter)
    return trainable


def controller_slot(student: ESPMedSAM, modality: str) -> int:
    """Index of the controller that serves ``modality`` (0 for the official single-controller layout).

    Raises:
        InputError: a model without controllers.
    """
    route = student.route(student.modality_ids(modality, 1))
    if route is None:
        raise InputError("this model has no modality controllers (exported with --drop-controllers)")
    return int(route.index[0])


def train_epoch(
    student: ESPMedSAM,
    stage: str,
    images: Sequence[DistillImage],
    inputs: InputStore,
    targets: Targets,
    optimizer: torch.optim.Optimizer,
    config: DistillConfig,
    rng: random.Random,
    progress: Callable[[DistillProgress], None] | None = None,
    *,
    encode: Callable[[torch.Tensor, str | None], torch.Tensor] | None = None,
) -> float:
    """One pass over ``images`` in single-modality batches (a random variant each); the mean MSE.

    ``encode``: the student's encoder as DDP wraps it under torchrun (default ``student.encode``).
    """
    batches = epoch_batches(images, config.batch_size, rng)
    encode = encode or student.encode
    total, count = 0.0, 0
    for step, batch in enumerate(batches, 1):
        variants = [rng.randrange(config.variants) for _ in batch]
        modality = batch[0].modality if stage == "modality" else None
        if distributed.is_distributed():
            value = _shared_step(encode, batch, variants, modality, inputs, targets, optimizer, config)
            total, count = total + value * len(batch), count + len(batch)
            if progress is not None:
                progress(DistillProgress("train", step, len(batches), total / count))
            continue
        x = inputs.batch(batch, variants).to(config.device)
        target = targets(batch, variants, x)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=config.bf16):
            prediction = encode(x, modality)
        loss = embedding_mse(prediction.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total, count = total + loss.item() * len(batch), count + len(batch)
        if progress is not None:
            progress(DistillProgress("train", step, len(batches), total / count))
    return total / max(count, 1)


def _shared_step(
    encode: Callable[[torch.Tensor, str | None], torch.Tensor],
    batch: Sequence[DistillImage],
    variants: Sequence[int],
    modality: str | None,
    inputs: InputStore,
    targets: Targets,
    optimizer: torch.optim.Optimizer,
    config: DistillConfig,
) -> float:
    """One optimiser step on this rank's share of ``batch``; returns the MSE over the whole batch.

    Each rank's loss is its squared-error sum over the whole batch's element count, times N, so DDP's
    mean of the ranks' gradients is the gradient of the batch's MSE (the shares may differ by one image).
    A rank left without images by a small batch still takes part: with a zero-image input in the common
    stage, or in the modality stage (whole student in eval mode, so no statistics are shared; the
    controller routing needs an image) with the batch's first image at weight 0.
    """
    mine, weight = distributed.share(list(zip(batch, variants, strict=True))), 1.0
    if not mine and modality is not None:
        mine, weight = [(batch[0], variants[0])], 0.0
    images, chosen = [image for image, _ in mine], [variant for _, variant in mine]
    size = config.image_size
    x = (inputs.batch(images, chosen) if mine else torch.zeros(0, 3, size, size)).to(config.device)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=config.bf16):
        prediction = encode(x, modality).float()
    target = targets(images, chosen, x) if mine else torch.zeros_like(prediction)
    squared = embedding_mse(prediction, target, reduction="sum") * weight
    elements = len(batch) * prediction.shape[1:].numel()
    optimizer.zero_grad(set_to_none=True)
    (squared * (distributed.world_size() / elements)).backward()
    optimizer.step()
    return float(distributed.all_reduce_sum(squared.detach())) / elements


class _StudentEncoder(nn.Module):
    """``student.encode`` as a module's forward: what DDP wraps (it reduces gradients only for a forward
    through itself)."""

    def __init__(self, student: ESPMedSAM) -> None:
        super().__init__()
        self.student = student

    def forward(self, x: torch.Tensor, modality: str | None) -> torch.Tensor:
        """(B, 3, S, S) -> (B, C, S/s, S/s), as ``ESPMedSAM.encode``."""
        return self.student.encode(x, modality)


def epoch_batches(images: Sequence[DistillImage], batch_size: int, rng: random.Random) -> list[list]:
    """Shuffled batches, each of one modality (one controller per step: the route is a single slot)."""
    batches = []
    for group in _by_modality(images).values():
        rng.shuffle(group)
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches


@torch.no_grad()
def held_out_scores(
    student: ESPMedSAM,
    images: Sequence[DistillImage],
    inputs: InputStore,
    targets: Targets,
    config: DistillConfig,
) -> dict[str, float]:
    """Embedding MSE and mean cosine similarity (over positions) on the held-out images, variant 0.

    Under torchrun each rank scores images ``rank, rank + N, ...`` and the sums are reduced.
    """
    if not images:
        return {}
    count = len(images)
    images = distributed.strided_share(images) if distributed.is_distributed() else images
    was_training = student.image_encoder.training
    student.image_encoder.eval()
    mse, cosine = 0.0, 0.0
    for start in range(0, len(images), config.batch_size):
        batch = list(images[start : start + config.batch_size])
        for modality, group in _by_modality(batch).items():
            x = inputs.batch(group, [0] * len(group)).to(config.device)
            target = targets(group, [0] * len(group), x)
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=config.bf16):
                prediction = student.encode(x, modality).float()
            mse += embedding_mse(prediction, target, reduction="none").mean((1, 2, 3)).sum().item()
            cosine += F.cosine_similarity(prediction, target, dim=1).mean((1, 2)).sum().item()
    student.image_encoder.train(was_training)
    mse, cosine = distributed.all_reduce_sum(torch.tensor([mse, cosine], dtype=torch.float64)).tolist()
    return {"held_out_mse": mse / count, "held_out_cosine": cosine / count}


def embedding_mse(prediction: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """MSE of (B, C, h, w) embeddings. Raises InputError when teacher and student shapes differ."""
    if prediction.shape != target.shape:
        raise InputError(
            f"teacher embedding {tuple(target.shape[1:])} does not match the student's "
            f"{tuple(prediction.shape[1:])}; the teacher must be a SAM ViT with 256 output channels"
        )
    return F.mse_loss(prediction, target, reduction=reduction)


def plot_curves(records: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Held-out MSE and cosine similarity per epoch (PNG); None without matplotlib or records."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    scored = [r for r in records if "held_out_mse" in r]
    if not scored:
        return None
    from espmedsam.files import atomic_write

    figure = Figure(figsize=(10, 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    mse_axes, cosine_axes = figure.subplots(1, 2)
    epochs = [r["epoch"] for r in scored]
    mse_axes.plot(epochs, [r["held_out_mse"] for r in scored], marker="o", label="held-out")
    trained = [r for r in records if "train_mse" in r]
    mse_axes.plot([r["epoch"] for r in trained], [r["train_mse"] for r in trained], marker=".", label="train")
    mse_axes.set(xlabel="epoch", ylabel="embedding MSE", title="MSE to the teacher", yscale="log")
    mse_axes.legend(fontsize="small")
    cosine_axes.plot(epochs, [r["held_out_cosine"] for r in scored], marker="o", color="tab:green")
    cosine_axes.set(xlabel="epoch", ylabel="cosine similarity", title="held-out cosine similarity")
    return atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=100))


class _CountingTeacher:
    """The teacher under no_grad (and optional bf16 autocast) on its own input normalisation, counting the
    images it embeds."""

    def __init__(self, teacher: nn.Module, student: ESPMedSAM, config: DistillConfig) -> None:
        self.teacher, self.student, self.config, self.images = teacher.eval(), student, config, 0

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        self.images += inputs.shape[0]
        x = teacher_input(inputs.to(self.config.device), self.student, self.config.teacher_input)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.config.teacher_bf16):
            embedding = self.teacher(x).float()
        # a finer teacher grid (LiteMedSAM's stride 4, a stride-16 student) is averaged to the student's
        grid = inputs.shape[-1] // self.student.config.encoder.output_stride
        if embedding.shape[-1] > grid and embedding.shape[-1] % grid == 0:
            embedding = F.adaptive_avg_pool2d(embedding, (grid, grid))
        return embedding


def _targets(
    teacher: _CountingTeacher,
    inputs: InputStore,
    config: DistillConfig,
    train_set: Sequence[DistillImage],
    held_out: Sequence[DistillImage],
    progress: Callable[[DistillProgress], None] | None,
) -> Targets:
    """Teacher embeddings from the filled cache, or (``use_cache: false``) from the teacher itself."""
    if not config.use_cache:
        return lambda images, variants, inputs: teacher(inputs)
    root = Path(config.cache_dir) if config.cache_dir else DEFAULT_CACHE_DIR
    describe = {
        "teacher": repr(getattr(teacher.teacher, "config", type(teacher.teacher).__name__)),
        "teacher_input": config.teacher_input,
        "bf16": config.teacher_bf16,
    }
    cache = EmbeddingCache(root, cache_folder_name(teacher.teacher, teacher.student, config), describe)
    jobs = [(image, v) for image in train_set for v in range(config.variants)]
    jobs += [(image, 0) for image in held_out]
    size = config.image_size

    def make(image: DistillImage, variant: int) -> Callable[[], torch.Tensor]:
        return lambda: inputs.get(image, variant)

    keyed = [(CacheKey(image.digest, size, v), make(image, v)) for image, v in jobs]
    report = None if progress is None else lambda d, t: progress(DistillProgress("cache", d, t))
    computed = fill(cache, keyed, teacher, batch_size=config.teacher_batch_size, progress=report)
    logger.info("teacher embedded %d inputs (%d cached) in %s", computed, len(keyed) - computed, cache.dir)

    def from_cache(images: Sequence[DistillImage], variants: Sequence[int], inputs: torch.Tensor):
        keys = [CacheKey(image.digest, size, v) for image, v in zip(images, variants, strict=True)]
        return torch.stack([cache.get(key) for key in keys]).to(config.device)

    return from_cache


def _by_modality(images: Sequence[DistillImage]) -> dict[str | None, list[DistillImage]]:
    groups: dict[str | None, list[DistillImage]] = {}
    for image in images:
        groups.setdefault(image.modality, []).append(image)
    return groups
