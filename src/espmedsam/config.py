"""Model configuration: one frozen dataclass per component, exact dict/JSON/YAML round trips.

Every field has a default (the paper's value); unknown or mistyped keys raise ``ConfigError`` naming
their dotted path.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from espmedsam.errors import ConfigError
from espmedsam.modalities import MODALITIES
from espmedsam.normalisation import NORMALISATIONS

T = TypeVar("T")

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # 3e-4: a string to PyYAML


class SerialisableConfig:
    """Dict, JSON and YAML round trips for the top-level config dataclasses (exact, tested)."""

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        return from_dict(cls, data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls: type[T], path: str | Path) -> T:
        return from_dict(cls, _read_yaml(path))


# TinyViT stem name -> (kernel, stride, padding) of its first and of its second Conv+BN layer
STEMS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "strided": ((3, 2, 1), (3, 2, 1)),  # MobileSAM / TinyViT: output stride 4
    "pointwise": ((1, 1, 0), (1, 1, 0)),  # LiteMedSAM: output stride 1, 256² input -> MobileSAM's 1024² grid
    # output stride 2: each 2x2 patch to one position, so stage 0's MBConvs see a quarter of the
    # positions; with merge_strides (1, 2, 1) the grid is the pointwise stem's (``distill.prefix``)
    "patch2": ((2, 2, 0), (1, 1, 0)),
}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Shared TinyViT-5M of MobileSAM (paper-notes §2)."""

    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    merge_strides: tuple[int, ...] = (2, 2, 1)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    out_chans: int = 256
    balanced_windows: bool = True  # split each axis into equal windows <= w; official: fixed w + padding
    stem: str = "strided"  # strided: MobileSAM's two 3x3 stride-2 convs; pointwise: LiteMedSAM's 1x1 ones;
    # patch2: a 2x2 stride-2 conv, then a 1x1 one
    # hidden widths of a pruned encoder (``distill.prune``), empty for the ratios above: one per MBConv of
    # stage 0, and one per attention block's MLP, stage by stage
    mbconv_hidden_dims: tuple[int, ...] = ()
    mlp_hidden_dims: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        stages = len(self.embed_dims)
        lengths = {
            "depths": len(self.depths),
            "num_heads": len(self.num_heads),
            "window_sizes": len(self.window_sizes),
        }
        lengths["merge_strides"] = len(self.merge_strides) + 1
        wrong = [f"{k} ({v if k != 'merge_strides' else v - 1})" for k, v in lengths.items() if v != stages]
        if wrong or stages < 2:
            raise ConfigError(
                f"encoder: embed_dims gives {stages} stages (at least 2); "
                "depths, num_heads and window_sizes need one "
                f"entry per stage and merge_strides one fewer; mismatched: {', '.join(wrong) or 'none'}"
            )
        for dim, heads in zip(self.embed_dims, self.num_heads, strict=True):
            if dim % heads:
                raise ConfigError(f"encoder: num_heads {heads} does not divide embed_dim {dim}")
        if self.stem not in STEMS:
            raise ConfigError(f"encoder: stem must be one of {', '.join(STEMS)}, got {self.stem!r}")
        for name, blocks in (
            ("mbconv_hidden_dims", self.depths[0]),
            ("mlp_hidden_dims", sum(self.depths[1:])),
        ):
            widths = getattr(self, name)
            if widths and (len(widths) != blocks or min(widths) < 1):
                raise ConfigError(f"encoder: {name} needs {blocks} positive widths (or none), got {widths}")

    def mbconv_hidden(self) -> list[int]:
        """Hidden width of each MBConv in stage 0."""
        ratio_width = int(self.embed_dims[0] * self.mbconv_expand_ratio)
        return list(self.mbconv_hidden_dims) or [ratio_width] * self.depths[0]

    def mlp_hidden(self, stage: int) -> list[int]:
        """Hidden width of each attention block's MLP in ``stage`` (1 onwards)."""
        if not self.mlp_hidden_dims:
            return [int(self.embed_dims[stage] * self.mlp_ratio)] * self.depths[stage]
        start = sum(self.depths[1:stage])
        return list(self.mlp_hidden_dims[start : start + self.depths[stage]])

    @property
    def output_stride(self) -> int:
        """Input pixels per embedding cell: the stem's stride times every patch merging's."""
        return math.prod(stride for _, stride, _ in STEMS[self.stem]) * math.prod(self.merge_strides)


@dataclasses.dataclass(frozen=True)
class ControllerConfig:
    """Modality controllers inside every attention block (paper-notes §2)."""

    num_prompt_tokens: int = 1
    adapter_ratio: float = 4.0
    shared: bool = False  # official layout: one controller used for every modality
    enabled: bool = True  # False: no controllers, the shared encoder alone (``export --drop-controllers``)
    # the first attention stage (encoder layer index, stage 0 being convolutional) whose blocks carry
    # controllers; earlier blocks run shared only, so a frozen prefix of them can be cached
    first_stage: int = 1


@dataclasses.dataclass(frozen=True)
class RefinerConfig:
    """Residual ConvNeXt blocks on the image embedding before SPPG and QDMD (``models/refiner.py``)."""

    depth: int = 0  # 0: none, as in the paper
    kernel_size: int = 7
    mlp_ratio: float = 2.0


@dataclasses.dataclass(frozen=True)
class SPPGConfig:
    """Self-patch prompt generator (paper-notes §3)."""

    hidden_dim: int = 64
    threshold: float = 0.5


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Query-decoupled modality decoder (paper-notes §4)."""

    depth: int = 2
    num_heads: int = 8
    mlp_dim: int = 2048
    attention_downsample: int = 2
    upscale_dims: tuple[int, ...] = (64, 32)
    extra_queries: int = 0  # official layout: 1 (7 queries, the last never decoded)
    shared_hypernetwork: bool = False  # official layout: one MLP for all queries
    decode_all_queries: bool = False  # official: every query joins the transformer; ours: the image's own


@dataclasses.dataclass(frozen=True)
class DetailConfig:
    """A light convolutional branch from the input image into QDMD's upscaled features
    (``models/detail.py``): fine structures (vessels) reach the mask at full resolution."""

    enabled: bool = False  # False, as in the paper: the mask comes from the embedding alone
    hidden_dim: int = 16


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """The optional promptable decoder (``models/prompt_decoder.py``): SAM's prompt encoder, mask decoder
    and IoU head beside QDMD, for boxes and clicks that correct a mask."""

    enabled: bool = False  # False: prompt-free only, as in the paper
    # a click decoder beside it, trained to correct the mask so far (``models/click_decoder.py``); without
    # one, clicks steer the box decoder (``interactive.py``)
    clicks: bool = False
    # the modalities where, after a foreground click, the clicked object is decoded again from its box by
    # the box decoder (``models/self_prompt.py``, ``refit_clicked``): where ``espmedsam prompts
    # calibrate-clicks`` found it raises the validation Dice after 1, 2 and 3 clicks, on average
    refit_clicked: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class QualityConfig:
    """The quality score of prompt-free masks (``models/quality.py``): a predicted Dice per mask, fitted on
    validation splits by ``espmedsam quality calibrate``."""

    enabled: bool = False
    max_components: int = 3  # a mask's largest components whose boxes the promptable decoder checks
    # the modalities whose masks ``--refine self`` refines with those boxes: where calibration found it
    # raises validation Dice; the others stay prompt-free
    refine_modalities: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """The modality classifier behind ``--modality auto`` (``models/classifier.py``)."""

    enabled: bool = False
    # the whole image squashed to input_size x input_size: neither its size nor its aspect ratio is a cue
    input_size: int = 128
    hidden_dim: int = 256
    # per-modality Gaussians of the hidden features (``train/classifier_statistics.py``): add-modality
    # without the old modalities' images, and "unknown" for an image that is none of the modalities
    statistics: bool = False
    statistics_rank: int = 32  # principal directions kept per modality, fewer than 2 x encoder.out_chans


@dataclasses.dataclass(frozen=True)
class ModelConfig(SerialisableConfig):
    """The whole ESP-MedSAM network and its input convention."""

    name: str = "default"
    modalities: tuple[str, ...] = MODALITIES
    image_size: int = 1024
    pixel_mean: tuple[float, ...] = IMAGENET_MEAN
    pixel_std: tuple[float, ...] = IMAGENET_STD
    encoder: EncoderConfig = EncoderConfig()
    controller: ControllerConfig = ControllerConfig()
    sppg: SPPGConfig = SPPGConfig()
    decoder: DecoderConfig = DecoderConfig()
    refiner: RefinerConfig = RefinerConfig()
    detail: DetailConfig = DetailConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    prompt: PromptConfig = PromptConfig()
    quality: QualityConfig = QualityConfig()
    inference_sizes: tuple[int, ...] = ()  # per modality, in ``modalities`` order; () = image_size for all
    # mean_std: (x - pixel_mean) / pixel_std; minmax: per image to [0, 1]
    input_normalisation: str = "mean_std"

    def __post_init__(self) -> None:
        multiple = self.size_multiple
        if self.image_size % multiple or self.image_size < multiple:
            raise ConfigError(f"image_size must be a positive multiple of {multiple}, got {self.image_size}")
        if not self.modalities:
            raise ConfigError("modalities must name at least one modality")
        _choice("input_normalisation", self.input_normalisation, NORMALISATIONS)
        check_inference_sizes(self.inference_sizes, self.modalities, multiple)
        side = self.classifier.input_size
        if self.classifier.enabled and (side % multiple or side < multiple):
            raise ConfigError(f"classifier.input_size must be a positive multiple of {multiple}, got {side}")
        rank, size = self.classifier.statistics_rank, 2 * self.encoder.out_chans
        if self.classifier.enabled and self.classifier.statistics and not 0 < rank < size:
            raise ConfigError(f"classifier.statistics_rank must be in [1, {size}), got {rank}")

    @property
    def size_multiple(self) -> int:
        """Input sides must be multiples of this: the encoder's output stride times SPPG's patch stride 2."""
        return 2 * self.encoder.output_stride


def check_inference_sizes(sizes: tuple[int, ...], modalities: tuple[str, ...], multiple: int) -> None:
    """Raise ConfigError unless ``sizes`` is empty or one positive multiple of ``multiple`` per modality."""
    if sizes and (len(sizes) != len(modalities) or any(s < multiple or s % multiple for s in sizes)):
        raise ConfigError(
            f"inference_sizes must be empty or {len(modalities)} positive multiples of {multiple} "
            f"(one per modality: {', '.join(modalities)}), got {list(sizes)}"
        )


ARCHS: tuple[str, ...] = ("espmedsam", "unet")
SCHEDULES: tuple[str, ...] = ("cosine", "constant")
RECIPES_DIR = Path(__file__).resolve().parent / "configs"


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Segmentation loss weights (paper-notes §6): mask = Dice + focal, plus λ · SPPG patch BCE."""

    dice_weight: float = 0.8
    focal_weight: float = 0.2
    focal_gamma: float = 2.0
    patch_weight: float = 0.5  # λ; unused by the U-Net baseline (no patch logits)


@dataclasses.dataclass(frozen=True)
class TrainConfig(SerialisableConfig):
    """One segmentation training run (``espmedsam train``, paper-notes §6).

    The network is ``model``, a registry name (``build_model(model)``), built at ``image_size``; with
    ``init`` the run starts from that native checkpoint instead (its stored config wins, ``model`` is
    ignored). ``arch: unet`` trains the MONAI BasicUNet baseline (``unet_features``) in the same loop.
    ``data`` lists ``DIR[:MODALITY]`` folders; relative paths are resolved against the current directory
    (not the YAML file's folder). Balanced sampling has no natural epoch: an epoch is ``steps_per_epoch``
    steps; validation runs every ``val_every`` epochs and training stops early, cleanly, once
    ``time_budget_minutes`` of wall time are spent. Outputs go to ``out_dir`` (default ``runs/<name>``).
    """

    name: str = "espmedsam"
    arch: str = "espmedsam"
    model: str = "default"
    init: str | None = None
    unet_features: tuple[int, ...] = (32, 32, 64, 128, 256, 32)
    data: tuple[str, ...] = ()
    train_split: str = "train"
    val_split: str | None = "val"  # None: no validation (and no best checkpoint)
    image_size: int = 256
    batch_size: int = 8
    epochs: int = 20
    steps_per_epoch: int = 200
    time_budget_minutes: float | None = None
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 200
    schedule: str = "cosine"
    min_lr_ratio: float = 0.01  # the cosine ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping
    bf16: bool = True  # bfloat16 autocast of the forward pass (losses stay float32)
    loss: LossConfig = LossConfig()
    augment: bool = True
    zoom_probability: float = 0.0  # chance of a 1.25-2x zoomed crop instead of the whole image
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"  # auto: a CUDA GPU when present, else the CPU
    input_sizes: tuple[int, ...] = ()  # per model modality; () = image_size for all; kept as inference_sizes
    frozen_encoder: bool = False  # train SPPG + QDMD on cached embeddings of the controller-free encoder
    # > 0: the stem and the first ``frozen_prefix`` encoder stages are frozen and their output features
    # cached (with the model input, for the detail branch); the later stages, their controllers, the neck
    # and the decoder train on them
    frozen_prefix: int = 0
    # with frozen_prefix: False keeps the shared later stages and neck as loaded too, so only the
    # controllers learn in the encoder (and the controller-free embedding, the classifier's input, stays)
    train_shared_suffix: bool = True
    # cached training sets hold at least this many samples each: small sets get more augmented variants
    # (at most 8), so DRIVE's 18 images are not seen as the same 18 samples every epoch
    min_cached_samples: int = 0
    # ModelConfig ``key=value`` overrides applied to the ``init`` checkpoint's config, e.g. to add
    # controllers or a detail branch to it: parameters the new layout adds start fresh (near the identity)
    model_overrides: tuple[str, ...] = ()
    # only these modalities' own parameters learn (controllers, queries, hypernetworks); the rest stays
    # bitwise as loaded, in eval mode (``espmedsam add-modality``)
    train_modalities: tuple[str, ...] = ()
    # frozen_encoder / frozen_prefix: cached samples per image (variant 0 as is, others augmented)
    variants: int = 1
    cache_dir: str | None = None  # frozen_encoder: default ~/.cache/espmedsam/encoder-embeddings
    val_every: int = 1  # epochs
    checkpoint_every: int = 500  # steps
    log_every: int = 10  # steps
    out_dir: str | None = None
    # under torchrun: batch norm statistics over the whole global batch (as one process), or per process
    # (faster: no collective in every batch norm layer; the usual DDP behaviour)
    sync_batchnorm: bool = True
    # a native checkpoint (or ``bundled``) whose masks the model also learns, each step, on the same
    # samples: ``teacher_weight`` times the per-pixel KL divergence of the model's mask probabilities from
    # the teacher's joins the loss. A student of the teacher (a pruned copy) then keeps its masks close
    # to the teacher's where the labels alone would let it drift.
    teacher: str | None = None
    teacher_weight: float = 0.0
    # > 0: each image's term weighted by its disagreement with the teacher to this power, so the images
    # whose masks part ways (a lesion found by one, missed by the other) dominate (losses.mask_divergence)
    teacher_focus: float = 0.0

    def __post_init__(self) -> None:
        _choice("arch", self.arch, ARCHS)
        _choice("schedule", self.schedule, SCHEDULES)
        if self.image_size % 32 or self.image_size < 32:
            raise ConfigError(f"image_size must be a positive multiple of 32, got {self.image_size}")
        for key in ("batch_size", "epochs", "steps_per_epoch", "val_every", "checkpoint_every", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        if not 0 <= self.zoom_probability <= 1:
            raise ConfigError(f"zoom_probability must be in [0, 1], got {self.zoom_probability}")
        for key in ("lr", "weight_decay", "warmup_steps", "min_lr_ratio", "grad_clip", "num_workers"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must not be negative, got {getattr(self, key)}")
        if self.time_budget_minutes is not None and self.time_budget_minutes <= 0:
            raise ConfigError(f"time_budget_minutes must be positive, got {self.time_budget_minutes}")
        if self.variants < 1:
            raise ConfigError(f"variants must be at least 1, got {self.variants}")
        if any(size < 8 or size % 8 for size in self.input_sizes):
            raise ConfigError(f"input_sizes must be positive multiples of 8, got {list(self.input_sizes)}")
        if (self.frozen_encoder or self.frozen_prefix) and self.arch != "espmedsam":
            raise ConfigError("frozen_encoder and frozen_prefix need arch: espmedsam")
        if self.frozen_encoder and self.frozen_prefix:
            raise ConfigError("frozen_encoder freezes the whole encoder: set frozen_prefix to 0 with it")
        if self.frozen_prefix < 0 or self.min_cached_samples < 0:
            raise ConfigError("frozen_prefix and min_cached_samples must not be negative")
        if self.train_modalities and self.arch != "espmedsam":
            raise ConfigError("train_modalities needs arch: espmedsam")
        self._check_teacher()

    def _check_teacher(self) -> None:
        if self.teacher_weight < 0:
            raise ConfigError(f"teacher_weight must not be negative, got {self.teacher_weight}")
        if self.teacher_focus < 0:
            raise ConfigError(f"teacher_focus must not be negative, got {self.teacher_focus}")
        if self.teacher_focus and not self.teacher:
            raise ConfigError("teacher_focus weighs a teacher's term, so it needs teacher")
        if bool(self.teacher) != (self.teacher_weight > 0):
            raise ConfigError("teacher and teacher_weight come together: set both, or neither")
        if self.teacher and (self.arch != "espmedsam" or self.frozen_encoder):
            raise ConfigError("teacher needs arch: espmedsam, trained on images or on a frozen_prefix")

    @property
    def run_dir(self) -> Path:
        """``out_dir``, or ``runs/<name>``."""
        return Path(self.out_dir) if self.out_dir else Path("runs") / self.name

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


DISTILL_STAGES = ("common", "modality")
TEACHER_INPUTS = ("sam", "medsam")


@dataclasses.dataclass(frozen=True)
class DistillConfig(SerialisableConfig):
    """One MMDKD stage (``espmedsam distill common|modality``, paper-notes §5).

    Student and teacher see the same (S, S) input, ``image_size``; the loss is the MSE between their
    (256, S/16, S/16) embeddings. Teacher embeddings are computed once per image and ``variants``
    flip/rotation variant (1: no augmentation, at most 8) and cached under ``cache_dir`` (default
    ``~/.cache/espmedsam/teacher-embeddings``); ``use_cache: false`` recomputes the teacher in every step
    instead, as the official script does. A seeded ``held_out`` fraction of the images is kept out of
    training to report the embedding MSE and cosine similarity after every epoch. ``teacher_input`` is the
    teacher's own input normalisation: ``sam`` for SAM ViTs, ``medsam`` (per-image min-max to [0, 1]) for
    MedSAM.
    """

    image_size: int = 256
    epochs: int = 10
    batch_size: int = 4
    lr: float = 5e-4  # Adam, as the official script
    lr_decay: float = 0.98  # ExponentialLR factor per epoch, as the official script
    weight_decay: float = 0.0
    variants: int = 1
    held_out: float = 0.1
    bf16: bool = True  # bfloat16 autocast of the student's forward pass
    teacher_bf16: bool = False  # float32 by default: the teacher runs once per image, accuracy is cheap
    teacher_input: str = "sam"  # sam: (x - mean) / std as SAM; medsam: per-image min-max to [0, 1]
    teacher_batch_size: int = 4
    use_cache: bool = True
    cache_dir: str | None = None
    input_memory_mb: int = 2048  # decoded, resized inputs kept in memory across epochs (0: none)
    device: str = "auto"  # auto: a CUDA GPU when present, else the CPU
    seed: int = 0
    out_dir: str | None = None  # None: runs/distill_<stage>

    def __post_init__(self) -> None:
        if self.image_size % 32 or self.image_size < 32:
            raise ConfigError(f"image_size must be a positive multiple of 32, got {self.image_size}")
        for key in ("epochs", "batch_size", "teacher_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        _choice("teacher_input", self.teacher_input, TEACHER_INPUTS)
        if self.input_memory_mb < 0:
            raise ConfigError(f"input_memory_mb must not be negative, got {self.input_memory_mb}")
        if not 1 <= self.variants <= 8:
            raise ConfigError(f"variants must be in 1..8, got {self.variants}")
        if not 0 <= self.held_out < 1:
            raise ConfigError(f"held_out must be in [0, 1), got {self.held_out}")
        if self.lr <= 0 or not 0 < self.lr_decay <= 1 or self.weight_decay < 0:
            raise ConfigError("need lr > 0, 0 < lr_decay <= 1 and weight_decay >= 0")


def load_distill_config(
    config: str | Path | None, stage: str, overrides: Sequence[str] = ()
) -> DistillConfig:
    """The ``stage`` section (``common`` or ``modality``) of a distillation recipe, with overrides.

    Raises:
        ConfigError: an unknown stage, a missing file or recipe, a recipe without that section, or a bad key.
    """
    _choice("stage", stage, DISTILL_STAGES)
    if config is None:
        return apply_overrides(DistillConfig(), overrides)
    data = _read_yaml(_recipe_path(config))
    if stage not in data:
        raise ConfigError(f"config {config} has no {stage!r} section")
    return apply_overrides(from_dict(DistillConfig, data[stage], stage), overrides)


def load_train_config(config: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """The training config of a YAML file or a shipped recipe name, with ``key=value`` overrides applied.

    Args:
        config: a YAML path or a recipe name in ``espmedsam/configs`` (``six_datasets_256``); None: defaults.
        overrides: ``dotted.key=value`` strings, values parsed as YAML (see :func:`apply_overrides`).
    Raises:
        ConfigError: a missing file or unknown recipe, an unknown key, or a value of the wrong type.
    """
    if config is None:
        return apply_overrides(TrainConfig(), overrides)
    return apply_overrides(TrainConfig.from_yaml(_recipe_path(config)), overrides)


def _recipe_path(config: str | Path) -> Path:
    """A YAML file, or the shipped recipe of that name."""
    path = Path(config)
    if not path.is_file():
        recipe = RECIPES_DIR / f"{config}.yaml"
        if path.suffix or path.parent != Path(".") or not recipe.is_file():
            names = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))) or "none"
            raise ConfigError(f"config {config} is neither a file nor a shipped recipe ({names})")
        path = recipe
    return path


def apply_overrides(config: T, overrides: Sequence[str]) -> T:
    """A copy of dataclass ``config`` with ``dotted.key=value`` overrides (values parsed with YAML).

    Example: ``apply_overrides(cfg, ["lr=1e-4", "loss.patch_weight=0.3", "data=[a:fundus, b]"])``.

    Raises:
        ConfigError: an override without ``=``, an unknown dotted key (named), or a value of the wrong type.
    """
    data = to_dict(config)
    for override in overrides:
        key, sep, text = override.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {override!r} must look like key=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"override {key}: cannot parse value {text!r}") from None
        node, parts = data, key.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(
                    f"unknown config key {'.'.join(parts[: depth + 1])!r} (in override {key!r})"
                )
            if depth == len(parts) - 1:
                node[part] = value
            else:
                node = node[part]
    return from_dict(type(config), data)


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"{key} must be one of {', '.join(options)}, got {value!r}")


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass as plain dicts, lists and scalars (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; missing fields keep their defaults.

    Raises:
        ConfigError: an unknown key or a value of the wrong type, naming its dotted path.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else key
        if key not in fields:
            raise ConfigError(f"unknown config key {dotted!r}")
        values[key] = _convert(hints[key], value, dotted)
    try:
        return cls(**values)
    except TypeError as error:
        raise ConfigError(f"{path or 'config'}: {error}") from None


def _convert(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    if origin in (typing.Union, types.UnionType):
        options = [h for h in typing.get_args(hint) if h is not type(None)]
        return None if value is None else _convert(options[0], value, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        item = typing.get_args(hint)[0]
        return tuple(_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    return _scalar(hint, value, path)


def _scalar(hint: Any, value: Any, path: str) -> Any:
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
        return float(value)  # PyYAML (YAML 1.1) reads 3e-4, without a dot, as a string
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (bool, str) and isinstance(value, hint):
        return value
    if hint is Any:
        return value
    raise ConfigError(f"{path} must be {getattr(hint, '__name__', hint)}, got {value!r}")


def _read_yaml(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as error:  # PyYAML's own message spans several lines: its problem and place
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or error
        raise ConfigError(f"{path}: invalid YAML ({problem}{where})") from None
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or error
        raise ConfigError(f"cannot read config {path}: {reason}") from None
    if data is not None and not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError(f"{path}: a config must be a mapping of keys to values, not a {kind}")
    return data or {}
