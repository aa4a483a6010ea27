"""A cheaper encoder prefix, distilled from the encoder it replaces (MMDKD's embedding MSE, model to itself).

LiteMedSAM's pointwise stem runs stage 0's MBConvs at every input pixel: memory-bound depthwise
convolutions and GELUs that take about half of a CPU forward pass. The student swaps the stem for a 2x2
stride-2 patch convolution (``stem: patch2``) and makes stage 0's patch merging stride 1, so stage 0 runs
at a quarter of the positions while stage 1 onwards see the same grid. It starts as the teacher on a
2x2-averaged image (the patch convolution holds the pointwise one's weights over four taps); everything
after stage 0 is copied and frozen. Only the stem and stage 0 learn, to reproduce the teacher's stage-0
tokens and its image embedding with each image's own controller (MSE, each scaled by the teacher's
variance), on random crops of training images at their modality's input size. With ``mask_weight`` it
also learns to give the teacher's masks through the frozen decoders (the KL divergence of the student's
per-pixel mask probabilities from the teacher's): thin structures such as vessels are a small part of
the embedding's error but most of the masks'.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from espmedsam.checkpoints.native import write_safetensors
from espmedsam.config import ModelConfig
from espmedsam.data.dataset import DatasetSource, SegmentationFolder
from espmedsam.errors import InputError
from espmedsam.losses import mask_divergence
from espmedsam.models.espmedsam import ESPMedSAM
from espmedsam.models.registry import build_model

logger = logging.getLogger(__name__)

STEM_CONV = "image_encoder.patch_embed.seq.0.c.weight"
PREFIX_KEYS = ("image_encoder.patch_embed.", "image_encoder.layers.0.")
PREFIX_FORMAT = "espmedsam-cheaper-prefix"


def cheaper_prefix_config(config: ModelConfig) -> ModelConfig:
    """The student's configuration: ``stem: patch2`` and stage 0's merge stride 1, the same output grid.

    Raises:
        InputError: a model whose stem is not the pointwise one, or whose stage 0 does not halve the grid.
    """
    encoder = config.encoder
    if encoder.stem != "pointwise" or encoder.merge_strides[0] != 2:
        raise InputError(
            "a cheaper prefix replaces a pointwise stem before a stride-2 stage 0; "
            f"this model has stem {encoder.stem!r} and merge strides {encoder.merge_strides}"
        )
    cheaper = dataclasses.replace(encoder, stem="patch2", merge_strides=(1, *encoder.merge_strides[1:]))
    return dataclasses.replace(config, encoder=cheaper)


def student_from(teacher: ESPMedSAM) -> ESPMedSAM:
    """A model with the cheaper prefix holding the teacher's weights (eval mode, its own copy).

    The 1x1 stem kernel is spread over the 2x2 patch at a quarter weight, so the student's stem sees the
    2x2 mean of the pixels the teacher's saw one by one.
    """
    student = build_model(cheaper_prefix_config(teacher.config))
    state = {name: tensor.clone() for name, tensor in teacher.state_dict().items()}
    pointwise = state[STEM_CONV]  # (C, 3, 1, 1)
    state[STEM_CONV] = pointwise.expand(-1, -1, 2, 2) / 4
    student.load_state_dict(state)
    return student.eval()


def prefix_parameters(model: ESPMedSAM) -> list[torch.nn.Parameter]:
    """The stem's and stage 0's parameters: what the prefix distillation trains."""
    encoder = model.image_encoder
    return [*encoder.patch_embed.parameters(), *encoder.layers[0].parameters()]


@dataclass(frozen=True)
class PrefixSample:
    """One training input: a (3, S, S) normalised image at its modality's input size and its modality id."""

    image: torch.Tensor
    modality: int


@dataclass(frozen=True)
class PrefixProgress:
    step: int
    steps: int
    loss: float
    held_out: float | None = None  # the held-out error the best student is chosen on, when measured


@dataclass
class PrefixHistory:
    """Per-step training losses, the held-out errors (step, tokens, embedding, mask) and of them the row
    the student was kept at."""

    losses: list[float] = dataclasses.field(default_factory=list)
    held_out: list[tuple[int, float, float, float]] = dataclasses.field(default_factory=list)
    best: tuple[int, float, float, float] | None = None
    seconds: float = 0.0


def prefix_errors(
    student: ESPMedSAM,
    teacher: ESPMedSAM,
    images: torch.Tensor,
    modality: torch.Tensor,
    *,
    masks: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The student's errors against the teacher on the same images.

    Args:
        images: (B, 3, S, S) normalised inputs.
        modality: (B,) modality ids; each image goes through its own controller and decoding channel.
        masks: False skips both decoders (a training step whose loss leaves the masks out) and gives 0
            for the mask divergence.
    Returns:
        Three scalars: the relative squared errors (MSE / teacher variance) of the stage-0 tokens and of
        the embedding, and the mean per-pixel KL divergence of the student's (B, 1, S, S) mask
        probabilities from the teacher's. Gradients reach the student's prefix only.
    """
    route = teacher.route(modality)
    with torch.no_grad():
        tokens = teacher.image_encoder.prefix(images, 1)
        embedding = teacher.image_encoder.suffix(tokens, 1, route)
    student_tokens = student.image_encoder.prefix(images, 1)
    student_embedding = student.image_encoder.suffix(student_tokens, 1, route)
    token_error = F.mse_loss(student_tokens.float(), tokens.float()) / tokens.float().var()
    embedding_error = F.mse_loss(student_embedding.float(), embedding.float()) / embedding.float().var()
    if not masks:
        return token_error, embedding_error, torch.zeros(())
    side = images.shape[-1]
    with torch.no_grad():
        teacher_masks = teacher.decode(embedding, modality, side, images).masks.float()
    student_masks = student.decode(student_embedding, modality, side, images).masks.float()
    return token_error, embedding_error, mask_divergence(student_masks, teacher_masks)


def random_crops(samples: Sequence[PrefixSample], crop: int, rng: random.Random) -> torch.Tensor:
    """(B, 3, crop, crop): a random window of each sample (the whole image when smaller), flipped at
    random."""
    out = []
    for sample in samples:
        side = sample.image.shape[-1]
        c = min(crop, side)
        y, x = rng.randrange(side - c + 1), rng.randrange(side - c + 1)
        window = sample.image[:, y : y + c, x : x + c]
        if c < crop:
            window = F.pad(window, (0, crop - c, 0, crop - c))
        if rng.random() < 0.5:
            window = window.flip(-1)
        out.append(window)
    return torch.stack(out)


def distill_prefix(
    student: ESPMedSAM,
    teacher: ESPMedSAM,
    train: Sequence[PrefixSample],
    held_out: Sequence[PrefixSample],
    *,
    steps: int,
    minutes: float | None = None,
    batch_size: int = 8,
    crop: int = 192,
    lr: float = 5e-4,
    mask_weight: float = 0.0,
    eval_every: int = 50,
    bf16: bool = True,
    seed: int = 0,
    progress: Callable[[PrefixProgress], None] | None = None,
    on_best: Callable[[ESPMedSAM], None] | None = None,
    params: Sequence[torch.nn.Parameter] | None = None,
) -> PrefixHistory:
    """Train the student's stem and stage 0 (or ``params``) in place; the rest of both models stays
    bitwise as it was.

    The loss is the token error plus the embedding error plus ``mask_weight`` times the mask divergence
    (``prefix_errors``). The learning rate follows a cosine over ``steps``; ``minutes`` stops earlier.
    The student keeps the weights of its best held-out error, the embedding error plus ``mask_weight``
    times the mask divergence, measured every ``eval_every`` steps and at the end. ``on_best`` is called
    with the student whenever that error reaches a new low (to save it, so an interrupted run loses
    nothing measured).
    """
    if not train or not held_out:
        # without held-out images no step could be chosen, and the untrained student would come back
        raise InputError("the prefix distillation needs training and held-out images")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    for model in (student, teacher):
        model.eval()  # batch norms keep the teacher's statistics; only weights move
        model.requires_grad_(False)
    params = list(params) if params is not None else prefix_parameters(student)
    for param in params:
        param.requires_grad_(True)
    trained = {name for name, param in student.named_parameters() if param.requires_grad}
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
    )
    by_modality: dict[int, list[PrefixSample]] = {}
    for sample in train:
        by_modality.setdefault(sample.modality, []).append(sample)
    groups = list(by_modality.values())
    history = PrefixHistory()

    def chosen_on(errors: tuple[float, float, float]) -> float:
        return errors[1] + mask_weight * errors[2]

    best = (held_out_error(student, teacher, held_out, crop, bf16), _trained_state(student, trained))
    history.held_out.append((0, *best[0]))
    history.best = history.held_out[-1]
    start = time.monotonic()
    for step in range(1, steps + 1):
        # every modality equally often: a few fundus images teach as much as hundreds of dermoscopy ones
        batch = [rng.choice(rng.choice(groups)) for _ in range(batch_size)]
        images = random_crops(batch, crop, rng)
        modality = torch.tensor([s.modality for s in batch])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            token_error, embedding_error, mask_error = prefix_errors(
                student, teacher, images, modality, masks=mask_weight > 0
            )
        loss = token_error + embedding_error + mask_weight * mask_error
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        history.losses.append(float(loss.detach()))
        out_of_time = minutes is not None and time.monotonic() - start > 60 * minutes
        measured = None
        if step % eval_every == 0 or step == steps or out_of_time:
            errors = held_out_error(student, teacher, held_out, crop, bf16)
            history.held_out.append((step, *errors))
            measured = chosen_on(errors)
            logger.info(
                "prefix distillation step %d: held-out error tokens %.4f, embedding %.4f, masks %.4f "
                "(train loss %.4f)",
                step, *errors, history.losses[-1],
            )  # fmt: skip
            if measured < chosen_on(best[0]):
                best = (errors, _trained_state(student, trained))
                history.best = history.held_out[-1]
                if on_best:
                    on_best(student)
        if progress:
            progress(PrefixProgress(step, steps, history.losses[-1], measured))
        if out_of_time:
            logger.info("prefix distillation: time budget reached at step %d of %d", step, steps)
            break
    student.load_state_dict(best[1], strict=False)
    student.requires_grad_(False)
    history.seconds = time.monotonic() - start
    return history


def held_out_error(
    student: ESPMedSAM, teacher: ESPMedSAM, samples: Sequence[PrefixSample], crop: int, bf16: bool = True
) -> tuple[float, float, float]:
    """``prefix_errors`` (stage-0 tokens, embedding, masks) averaged over fixed crops of the held-out
    samples."""
    if not samples:
        return (math.nan, math.nan, math.nan)
    rng = random.Random(1234)  # the same windows at every measurement
    totals = [0.0, 0.0, 0.0]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for first in range(0, len(samples), 8):
            chunk = samples[first : first + 8]
            images = random_crops(chunk, crop, rng)
            modality = torch.tensor([s.modality for s in chunk])
            errors = prefix_errors(student, teacher, images, modality)
            for i, error in enumerate(errors):
                totals[i] += float(error) * len(chunk)
    tokens, embedding, masks = (total / len(samples) for total in totals)
    return tokens, embedding, masks


def prepare_prefix_samples(
    model: ESPMedSAM,
    sources: Sequence[DatasetSource],
    split: str,
    *,
    max_per_dataset: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[PrefixSample]:
    """Each dataset's ``split`` images, preprocessed at their modality's input size (the first
    ``max_per_dataset`` of each)."""
    samples = []
    for source in sources:
        folder = SegmentationFolder(source, split)
        size = model.input_size(source.modality)
        modality = model.modalities.index(source.modality)
        for index in range(min(len(folder), max_per_dataset or len(folder))):
            image, _ = model.preprocess(folder[index].image, size)
            samples.append(PrefixSample(image[0], modality))
            if progress:
                progress(1)
    return samples


def _trained_state(model: ESPMedSAM, names: set[str]) -> dict[str, torch.Tensor]:
    """A copy of the named parameters' values."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in names}


def _prefix_state(model: ESPMedSAM) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(PREFIX_KEYS)}


def save_prefix(model: ESPMedSAM, path: str | Path) -> Path:
    """Write only the student's stem and stage 0 (a few hundred kB): with the checkpoint it was distilled
    from, they are the whole student (``load_prefix``)."""
    return write_safetensors(path, _prefix_state(model), {"format": PREFIX_FORMAT})


def is_prefix_file(path: str | Path) -> bool:
    """Whether ``path`` is a ``save_prefix`` file (else, say, a whole checkpoint)."""
    try:
        with safe_open(str(path), "pt") as file:
            return (file.metadata() or {}).get("format") == PREFIX_FORMAT
    except (OSError, SafetensorError):
        return False


def load_prefix(student: ESPMedSAM, path: str | Path) -> ESPMedSAM:
    """Put the stem and stage 0 of ``save_prefix``'s file into ``student`` (from ``student_from``).

    Raises:
        InputError: not such a file, or tensors of other names or shapes.
    """
    try:
        with safe_open(str(path), "pt") as file:
            fmt = (file.metadata() or {}).get("format")
            tensors = {key: file.get_tensor(key) for key in file.keys()}
    except (OSError, SafetensorError) as error:
        raise InputError(f"{path}: not a readable safetensors file ({error})") from None
    expected = _prefix_state(student)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if fmt != PREFIX_FORMAT or shapes != {k: tuple(v.shape) for k, v in expected.items()}:
        raise InputError(f"{path}: not a cheaper prefix of this model (espmedsam distill prefix writes one)")
    student.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, strict=False)
    return student
