"""Segmentation training loop (paper-notes §6): mixed-modality batches, Dice + focal + patch loss, AdamW.

Each step draws a batch from all datasets with equal probability (``BalancedSampler``); a modality's
controller, query and hypernetwork get gradients only when it is in the batch (the others keep ``None``
gradients and AdamW leaves them untouched). Outputs in ``config.run_dir``:

- ``config.yaml`` the run's config; ``log.jsonl`` and ``curves.png`` (see ``history``);
- ``best.safetensors`` (highest mean validation Dice over datasets) and ``last.safetensors``, native
  checkpoints (``load_model``; ``load_unet`` for the U-Net baseline);
- ``state.pt`` every ``checkpoint_every`` steps and at the end: model, optimiser, schedule, sampler,
  counters and every RNG state, so ``resume=True`` continues bit for bit (with ``num_workers`` = 0 or
  more: augmentation is a function of (seed, epoch, index), batches of (seed, epoch)).

Under ``torchrun`` (see ``distributed``) each process trains on its contiguous share of every batch
under DistributedDataParallel: ``batch_size`` stays the global batch (so the recipe's optimisation is the
same whatever the number of processes, which must divide it), batch norm statistics span all shares
(``sync_batchnorm``, unless the config turns it off), and logged losses and validation Dice are reduced
over the ranks, so a run on N processes follows the one-process run up to float rounding. Rank 0 alone
writes files; every rank reads ``state.pt`` on resume (on a filesystem they share), so a run may resume
on another number of processes.
Every rank restores rank 0's RNG states; no draw depends on the rank (the model is built from ``seed``,
augmentation and batches from (seed, epoch, index)).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from espmedsam.checkpoints.lineage import run_record
from espmedsam.checkpoints.native import default_checkpoint, load_model, load_unet, save_model, save_unet
from espmedsam.config import TrainConfig, apply_overrides, from_dict
from espmedsam.data.dataset import SegmentationFolder, parse_dataset_arg
from espmedsam.data.sampler import BalancedSampler
from espmedsam.data.training_set import MixedModalityDataset
from espmedsam.device import autocast
from espmedsam.errors import ConfigError, DataError
from espmedsam.files import remove_stale_temporaries, write_text
from espmedsam.losses import MaskLoss, SegmentationLoss, mask_divergence
from espmedsam.modality_edits import train_only_modalities
from espmedsam.models.registry import build_model, get_config
from espmedsam.models.unet import UNetBaseline, UNetConfig
from espmedsam.train import distributed
from espmedsam.train.frozen import (
    DEFAULT_CACHE,
    CachedEmbeddingSet,
    EncoderCache,
    build_cache,
    encoder_fingerprint,
)
from espmedsam.train.history import History
from espmedsam.train.optim import build_optimizer, build_scheduler
from espmedsam.train.state import load_state, restore_rng, rng_state, save_state
from espmedsam.train.sync_batchnorm import sync_batchnorm
from espmedsam.train.validate import ValidationSet, collate_by_size, forward_group, validate

logger = logging.getLogger(__name__)

STATE_FILE, BEST_FILE, LAST_FILE = "state.pt", "best.safetensors", "last.safetensors"
LOG_FILE, CURVES_FILE, CONFIG_FILE = "log.jsonl", "curves.png", "config.yaml"
# config keys a resumed run may change without changing its trajectory
RESUMABLE_CHANGES: tuple[str, ...] = ("time_budget_minutes", "num_workers", "checkpoint_every", "log_every")
_LOGGED: tuple[str, ...] = (
    "loss",
    "dice_loss",
    "focal_loss",
    "patch_loss",
    "teacher_loss",
    "train_dice",
    "lr",
)


@dataclass(frozen=True)
class TrainProgress:
    """What the progress callback receives after every step."""

    step: int
    total_steps: int
    epoch: int
    loss: float
    train_dice: float  # hard Dice of the last batch
    val_dice: float | None  # mean over datasets of the last validation
    images_per_s: float
    lr: float
    elapsed_s: float
    eta_s: float  # at the current speed, capped by the time budget left


@dataclass(frozen=True)
class TrainResult:
    """Where a run ended and what it wrote."""

    out_dir: Path
    steps: int
    stopped_early: bool  # the time budget ran out before ``total_steps``
    elapsed_s: float
    val_dice: dict[str, float]  # last validation, per dataset
    best_dice: float | None  # best mean validation Dice, and its step
    best_step: int | None
    best_path: Path | None
    last_path: Path
    state_path: Path


@dataclass
class _Counters:
    step: int = 0
    elapsed_s: float = 0.0
    best_dice: float | None = None
    best_step: int | None = None
    val_step: int | None = None
    val_dice: dict[str, float] = field(default_factory=dict)
    val_seconds: float = 0.0
    setup_s: float = 0.0  # building the model and the datasets (and their caches), before step 1


def train(
    config: TrainConfig, *, resume: bool = False, progress: Callable[[TrainProgress], None] | None = None
) -> TrainResult:
    """Train a model as ``config`` says; see the module docstring for what is written.

    Under ``torchrun`` every process calls this; ``progress`` is called on every rank, and every rank
    returns the same result once rank 0 has written its files.

    Args:
        config: the run; ``config.data`` must name at least one dataset folder.
        resume: continue from ``run_dir/state.pt`` (the config may differ only in ``RESUMABLE_CHANGES``).
        progress: called with a :class:`TrainProgress` after every step.
    Raises:
        ConfigError: no data, a resumed run whose config differs, or a ``batch_size`` that the number of
            processes does not divide.
        DataError: unreadable dataset folders. CheckpointError: a bad ``init`` or state file.
    """
    check_world_size(config.batch_size)
    with distributed.process_group(config.device) as device:
        return _Trainer(config, device=device, resume=resume, progress=progress).run()


def check_world_size(batch_size: int) -> None:
    """Raise ConfigError unless the processes (torchrun's WORLD_SIZE) divide the global ``batch_size``."""
    processes = distributed.world_size()
    if batch_size % processes:
        raise ConfigError(
            f"batch_size {batch_size} is the global batch and must be divisible by the {processes} "
            f"processes (torchrun --nproc_per_node x --nnodes); use a multiple of {processes}"
        )


def build_network(config: TrainConfig, *, layout: str | Path | None = None) -> nn.Module:
    """The model to train, in train mode: fresh (initialised from ``config.seed``) or loaded from ``init``.

    ``input_sizes`` become the model's per-modality ``inference_sizes``; with ``frozen_encoder`` the image
    encoder's parameters stop requiring gradients (and the optimiser never sees them). ``layout``: a
    checkpoint of this run to build from instead of ``init`` (a resumed run keeps its own layout even when
    the ``init`` file has since gained a part).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if config.arch == "unet":
            model: Any = (
                load_unet(layout or config.init)
                if layout or config.init
                else UNetBaseline(UNetConfig(features=config.unet_features))
            )
        else:
            init = layout or resolve_init(config.init)
            model = load_model(init) if init else build_model(get_config(config.model))
            if config.model_overrides:
                model = with_layout(model, config.model_overrides)
            quality = getattr(model, "quality", None)
            if quality is not None and not config.train_modalities:
                # the score was fitted to these weights' masks: once they train it is stale, until
                # ``espmedsam quality calibrate`` refits it (a step of the recipe). Training some
                # modalities alone leaves the others' masks, and so their score, bitwise as they were.
                quality.calibrated.fill_(False)
    model.config = dataclasses.replace(
        model.config, image_size=config.image_size, **_sizes_field(model, config.input_sizes)
    )
    if config.frozen_encoder:
        model.image_encoder.requires_grad_(False)
    if config.frozen_prefix:
        freeze_prefix(model, config.frozen_prefix, shared_suffix=config.train_shared_suffix)
    if config.train_modalities:  # the shared parts stay as loaded: no gradient, no batch-norm update
        train_only_modalities(model, config.train_modalities)
        return model.eval()
    return model.train()


BUNDLED = "bundled"  # ``init: bundled`` continues from the weights shipped in the package


def resolve_init(init: str | None) -> str | Path | None:
    """``init`` as a path: ``bundled`` names the package's default weights.

    Raises:
        ConfigError: ``bundled`` in an installation without them.
    """
    if init != BUNDLED:
        return init
    path = default_checkpoint()
    if path is None:
        raise ConfigError("init: bundled, but this installation has no bundled weights")
    return path


def with_layout(model: nn.Module, overrides: tuple[str, ...]) -> nn.Module:
    """``model`` rebuilt with ``ModelConfig`` overrides, its weights kept by name; what the new layout
    adds (controllers, a detail branch) keeps its fresh initialisation, near or at the identity.

    Raises:
        ConfigError: a bad override, or one that would drop or reshape existing weights.
    """
    config = apply_overrides(model.config, overrides)
    grown = build_model(config)
    old, new = model.state_dict(), grown.state_dict()
    lost = [k for k in old if k not in new or new[k].shape != old[k].shape]
    if lost:
        raise ConfigError(
            f"model_overrides may only add parameters; {len(lost)} existing ones would be dropped or "
            f"reshaped (first: {lost[0]})"
        )
    grown.load_state_dict(old, strict=False)
    grown.lineage = getattr(model, "lineage", [])
    return grown


def freeze_prefix(model: nn.Module, depth: int, *, shared_suffix: bool = True) -> None:
    """Stop gradients through the encoder's stem and first ``depth`` stages (and, without
    ``shared_suffix``, through every shared encoder weight: only the controllers learn), and keep every
    encoder batch norm on its pretrained statistics (``TinyViT.frozen_batchnorm``).

    Raises:
        ConfigError: ``depth`` not below the number of stages, or controllers inside the prefix.
    """
    encoder = model.image_encoder
    stages = len(encoder.layers)
    if depth >= stages:
        raise ConfigError(f"frozen_prefix must be below the encoder's {stages} stages (use frozen_encoder)")
    controller = model.config.controller
    if controller.enabled and controller.first_stage < depth:
        raise ConfigError(
            f"frozen_prefix {depth} would freeze controllers: set model controller.first_stage >= {depth}"
        )
    encoder.patch_embed.requires_grad_(False)
    for layer in encoder.layers[:depth]:
        layer.requires_grad_(False)
    if not shared_suffix:
        for name, parameter in encoder.named_parameters():
            parameter.requires_grad_(".controllers." in name)
    encoder.frozen_batchnorm = True


def _sizes_field(model: nn.Module, sizes: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    if not sizes:
        return {}
    if not hasattr(model.config, "inference_sizes") or len(sizes) != len(model.config.modalities):
        raise ConfigError(
            f"input_sizes needs one size per model modality ({', '.join(model.config.modalities)}), "
            f"got {list(sizes)}"
        )
    return {"inference_sizes": tuple(sizes)}


def save_weights(model: nn.Module, path: Path) -> Path:
    """A native checkpoint of an ESP-MedSAM or U-Net baseline model."""
    return save_unet(model, path) if isinstance(model, UNetBaseline) else save_model(model, path)


def build_datasets(
    config: TrainConfig, model: nn.Module, teacher: nn.Module | None = None
) -> tuple[Any, Any, tuple[str, ...]]:
    """Training set, validation set (None without ``val_split``) and the dataset names.

    With ``frozen_encoder`` both are ``CachedEmbeddingSet``s of the model's embeddings at its per-modality
    input sizes; otherwise image sets at ``image_size``, normalised as the model's config says. With a
    frozen prefix and a ``teacher``, the training items also carry the teacher's prefix features.

    Raises:
        ConfigError: no dataset folder in ``config.data``.
    """
    if not config.data:
        raise ConfigError("data: no dataset folders; set data: [DIR[:MODALITY], ...]")
    sources = [parse_dataset_arg(item) for item in config.data]
    counts = [s.name for s in sources]
    names = tuple(s.name if counts.count(s.name) == 1 else f"{s.name}#{i}" for i, s in enumerate(sources))
    _require_modalities(sources, model.config.modalities)
    folders = [SegmentationFolder(s, config.train_split, cache=True) for s in sources]
    _require_images(folders)
    if config.frozen_encoder or config.frozen_prefix:
        return _cached_datasets(config, model, folders, sources, names, teacher)
    mean, std = model.config.pixel_mean, model.config.pixel_std
    normalisation = getattr(model.config, "input_normalisation", "mean_std")  # the U-Net has none
    train_set = MixedModalityDataset(
        folders,
        config.image_size,
        mean,
        std,
        augment=config.augment,
        zoom_probability=config.zoom_probability,
        seed=config.seed,
        normalisation=normalisation,
        modalities=model.config.modalities,
    )
    if not config.val_split:
        return train_set, None, names
    val_folders = [SegmentationFolder(s, config.val_split, cache=True) for s in sources]
    val_set = ValidationSet(
        val_folders, config.image_size, mean, std, normalisation, modalities=model.config.modalities
    )
    return train_set, val_set, names


def _require_modalities(sources: list, modalities: tuple[str, ...]) -> None:
    """Name a dataset whose modality the model does not have (``espmedsam add-modality`` adds one)."""
    for source in sources:
        if source.modality not in modalities:
            raise ConfigError(
                f"{source.root}: modality {source.modality!r} is not one of the model's "
                f"({', '.join(modalities)}); espmedsam add-modality adds one"
            )


def _require_images(folders: list[SegmentationFolder]) -> None:
    """Name an empty training split's folder (both kinds of training set), before the sampler refuses a
    dataset of size 0."""
    for folder in folders:
        if not len(folder):
            split = f"split {folder.split!r}" if folder.split else "the folder"
            raise DataError(f"{folder.source.root}: no images in {split}; nothing to train on")


def _cached_datasets(
    config: TrainConfig,
    model: nn.Module,
    folders: list[SegmentationFolder],
    sources: list,
    names: tuple,
    teacher: nn.Module | None = None,
) -> tuple[CachedEmbeddingSet, CachedEmbeddingSet | None, tuple[str, ...]]:
    """Frozen-encoder (or frozen-prefix) training and validation sets, their missing entries computed
    first; with ``teacher``, the training set paired with the teacher's prefix on the same samples."""
    depth = config.frozen_prefix or None
    sizes = [model.input_size(folder.modality) for folder in folders]
    modalities = model.config.modalities
    variants = [cached_variants(config, len(folder)) for folder in folders]

    def training_set(encoder: nn.Module, what: str) -> CachedEmbeddingSet:
        cache = EncoderCache(config.cache_dir or DEFAULT_CACHE, encoder_fingerprint(encoder, depth))
        dataset = CachedEmbeddingSet(
            cache, folders, sizes, variants, seed=config.seed, modalities=modalities, depth=depth
        )
        _fill(encoder, dataset, config, what)
        return dataset

    train_set = training_set(model, "embedding the training images")
    if teacher is not None:
        train_set.pair_with_teacher(training_set(teacher, "embedding the training images for the teacher"))
    cache = train_set.cache
    if not config.val_split:
        return train_set, None, names
    val_folders = [SegmentationFolder(s, config.val_split, cache=True) for s in sources]
    val_set = CachedEmbeddingSet(
        cache, val_folders, sizes, 1, seed=config.seed, modalities=modalities, depth=depth
    )
    _fill(model, val_set, config, "embedding the validation images")
    return train_set, val_set, names


def cached_variants(config: TrainConfig, images: int) -> int:
    """Cached samples per image of a set of ``images``: ``variants``, or more (at most 8) so that the set
    holds ``min_cached_samples``."""
    wanted = -(-config.min_cached_samples // max(images, 1))
    return max(config.variants, min(8, wanted))


def _fill(model: nn.Module, dataset: CachedEmbeddingSet, config: TrainConfig, what: str) -> None:
    def report(done: int, total: int) -> None:
        if done == total or done % 200 < 4:
            logger.info("%s: %d/%d", what, done, total)

    build_cache(model, dataset, seed=config.seed, bf16=config.bf16, progress=report)
    for folder in dataset.folders:  # training reads the embeddings alone from now on
        folder.release_cache()


def load_teacher(config: TrainConfig, student: nn.Module, device: torch.device) -> nn.Module | None:
    """``config.teacher`` loaded, in eval mode and without gradients (None without one). It sees the
    model's own inputs, so both must read images alike.

    Raises:
        ConfigError: a teacher of other modalities, or of another input normalisation, than the model's.
    """
    if not config.teacher:
        return None
    teacher = load_model(resolve_init(config.teacher)).to(device).eval().requires_grad_(False)
    for field_name in ("modalities", "input_normalisation", "pixel_mean", "pixel_std"):
        theirs, ours = getattr(teacher.config, field_name), getattr(student.config, field_name)
        if theirs != ours:
            raise ConfigError(f"teacher: its {field_name} ({theirs}) differs from the model's ({ours})")
    return teacher


class _Trainer:
    """One run: the objects of training and the counters that ``state.pt`` saves."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        device: torch.device,
        resume: bool,
        progress: Callable[[TrainProgress], None] | None,
    ) -> None:
        self.config, self.progress, self.dir = config, progress, config.run_dir
        setup_start = time.monotonic()
        self.main = distributed.is_main()  # rank 0 writes every file; the other ranks write nothing
        state = load_state(self.dir / STATE_FILE) if resume else None
        if state is not None:
            _check_resumable(config, from_dict(TrainConfig, state["config"]))
        self.device = device
        # a resumed run is rebuilt from its own last checkpoint, written with state.pt: the same layout
        layout = self.dir / LAST_FILE if state is not None and (self.dir / LAST_FILE).is_file() else None
        self.model = build_network(config, layout=layout).to(self.device)
        self.lineage = list(getattr(self.model, "lineage", []))  # the runs behind ``init``
        if layout is not None:
            self.lineage = self.lineage[:-1]  # less this run's own record, which ``_save`` renews
        if distributed.is_distributed() and config.sync_batchnorm:
            sync_batchnorm(self.model)  # the model is the trainer's own: no need to swap back
        self.teacher = load_teacher(config, self.model, self.device)
        self.train_set, self.val_set, self.names = build_datasets(config, self.model, self.teacher)
        self.sampler = BalancedSampler(
            self.train_set.dataset_sizes, config.steps_per_epoch * config.batch_size, config.seed
        )
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = build_scheduler(self.optimizer, config)
        loss = config.loss
        self.loss = SegmentationLoss(
            MaskLoss(loss.dice_weight, loss.focal_weight, gamma=loss.focal_gamma),
            patch_weight=loss.patch_weight,
        )
        self.counters = _Counters()
        self.history: History | None = None
        if self.main:
            for stale in remove_stale_temporaries(self.dir):  # a killed run's half-written files
                logger.info("removed %s, left by an interrupted write", stale.name)
            write_text(self.dir / CONFIG_FILE, config.to_yaml())
            self.history = History(self.dir / LOG_FILE, resume_step=state["step"] if state else None)
        self._window: dict[str, float] = {}
        self._saved_step: int | None = None
        self._validation_pause, self._speed = 0.0, 0.0
        if state is not None:
            self._restore(state)
        else:
            self.counters.setup_s = time.monotonic() - setup_start
        teaching = (
            _Teaching(self.teacher, config.teacher_weight, config.teacher_focus)
            if self.teacher is not None
            else None
        )
        self.step_loss = _StepLoss(self.model, self.loss, self.device, config.bf16, teaching)
        # the U-Net uses every parameter in every step; ESP-MedSAM trains the modalities of the step's share
        unused = config.arch != "unet"
        self.parallel = distributed.data_parallel(self.step_loss, self.device, unused_parameters=unused)
        self._clock = time.monotonic()

    def run(self) -> TrainResult:
        cfg, stopped = self.config, False
        while self.counters.step < cfg.total_steps and not stopped:
            epoch, offset = divmod(self.counters.step, cfg.steps_per_epoch)
            for batch in self._batches(epoch, offset):
                self._train_step(batch, epoch)
                step = self.counters.step
                if step % cfg.steps_per_epoch == 0 and (epoch + 1) % cfg.val_every == 0:
                    self._validate()
                self._tick()
                stopped = self._over_budget()
                self._log(epoch, flush=stopped)
                if step % cfg.checkpoint_every == 0:
                    self._checkpoint()
                self._notify(epoch)
                if stopped:
                    logger.info("time budget of %s min spent at step %d", cfg.time_budget_minutes, step)
                    break
        return self._finish(stopped)

    def _batches(self, epoch: int, skip: int) -> DataLoader:
        """The epoch's batches (a function of seed and epoch), less the first ``skip`` already trained on."""
        cfg = self.config
        self.sampler.set_epoch(epoch)
        indices = list(self.sampler)
        self.train_set.set_epoch(epoch)
        batches = [indices[i : i + cfg.batch_size] for i in range(0, len(indices), cfg.batch_size)]
        # under torchrun each rank takes its equal, contiguous share of every global batch
        batches = [distributed.share(batch) for batch in batches]
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        return DataLoader(
            self.train_set,
            batch_sampler=batches[skip:],
            num_workers=cfg.num_workers,
            generator=generator,
            collate_fn=collate_by_size,
        )

    def _train_step(self, groups: list[dict[str, torch.Tensor]], epoch: int) -> None:
        """One optimiser step over a batch of one or more same-size groups (loss weighted by group size).

        Each rank's loss is the mean over its share: the shares are equal, so DDP's mean of the ranks'
        gradients is the gradient of the mean over the global batch.
        """
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        groups = [{k: v.to(self.device) for k, v in group.items()} for group in groups]
        count = sum(len(group["mask"]) for group in groups)
        weights = [len(group["mask"]) / count for group in groups]
        if distributed.is_distributed():
            # one forward and one backward through DDP, whatever the number of groups on this rank
            outputs = self.parallel(groups)
            pairs = zip(outputs, weights, strict=True)
            torch.stack([_weighted(out["total"], w, len(groups)) for out, w in pairs]).sum().backward()
        else:
            outputs = []
            for group, weight in zip(groups, weights, strict=True):
                [out] = self.step_loss([group])
                # one group (every image batch) keeps its loss as is, so single-size runs are unchanged
                _weighted(out["total"], weight, len(groups)).backward()
                outputs.append(out)
        sums = _metric_sums(outputs, groups, weights)
        if cfg.grad_clip > 0:
            trained = [p for p in self.model.parameters() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.counters.step += 1
        values = {**sums, "lr": lr, "images": float(count * distributed.world_size())}
        for key, value in values.items():
            self._window[key] = self._window.get(key, 0.0) + value
        self._window["steps"] = self._window.get("steps", 0.0) + 1
        self._last = values

    def _tick(self) -> None:
        """Add the wall time since the last call to the elapsed time and, less validation, to the window."""
        now = time.monotonic()
        self.counters.elapsed_s += now - self._clock
        # images/s counts training only: the time spent validating is left out
        self._window["seconds"] = (
            self._window.get("seconds", 0.0) + now - self._clock - self._validation_pause
        )
        self._clock, self._validation_pause = now, 0.0

    def _log(self, epoch: int, *, flush: bool = False) -> None:
        """Append the means over the last ``log_every`` steps to the history."""
        counters, window = self.counters, self._window
        self._speed = window["images"] / max(window["seconds"], 1e-9)
        if counters.step % self.config.log_every and counters.step < self.config.total_steps and not flush:
            return
        # a part the run has not got (the teacher term, without a teacher) is not logged
        means = {k: window[k] / window["steps"] for k in _LOGGED if k in window}
        record = {"kind": "train", "step": counters.step, "epoch": epoch, **means}
        if self.history is not None:
            self.history.append({**record, "images_per_s": self._speed, "elapsed_s": counters.elapsed_s})
        self._window = {}

    def _notify(self, epoch: int) -> None:
        if self.progress is None:
            return
        cfg, counters, last = self.config, self.counters, self._last
        eta = (cfg.total_steps - counters.step) * cfg.batch_size / max(self._speed, 1e-9)
        if cfg.time_budget_minutes is not None:
            eta = min(eta, max(0.0, 60 * cfg.time_budget_minutes - counters.elapsed_s))
        self.progress(
            TrainProgress(
                step=counters.step,
                total_steps=cfg.total_steps,
                epoch=epoch,
                loss=last["loss"],
                train_dice=last["train_dice"],
                val_dice=_mean(counters.val_dice) if counters.val_dice else None,
                images_per_s=self._speed,
                lr=last["lr"],
                elapsed_s=counters.elapsed_s,
                eta_s=eta,
            )
        )

    def _validate(self) -> None:
        counters = self.counters
        if self.val_set is None or counters.val_step == counters.step:
            return
        start = time.monotonic()
        scores = validate(
            self.model,
            self.val_set,
            self.names,
            batch_size=self.config.batch_size,
            bf16=self.config.bf16,
            device=self.device,
            across_ranks=distributed.is_distributed(),
        )
        mean = _mean(scores)  # the same on every rank: the best checkpoint is chosen alike everywhere
        counters.val_step, counters.val_dice = counters.step, scores
        self._saved_step = None  # the counters changed: the next checkpoint must be written
        improved = counters.best_dice is None or mean > counters.best_dice
        if improved:
            counters.best_dice, counters.best_step = mean, counters.step
        epoch = (counters.step - 1) // self.config.steps_per_epoch
        record = {"kind": "val", "step": counters.step, "epoch": epoch, "val_dice": scores}
        if self.history is not None:
            record |= {
                "val_mean_dice": mean,
                "best_dice": counters.best_dice,
                "elapsed_s": counters.elapsed_s,
            }
            self.history.append(record)
            self.history.plot(self.dir / CURVES_FILE)
        if improved and self.main:
            self._save(BEST_FILE)
        counters.val_seconds = time.monotonic() - start
        self._validation_pause += counters.val_seconds
        logger.info("step %d: validation Dice %.4f (best %.4f)", counters.step, mean, counters.best_dice)

    def _checkpoint(self) -> None:
        if self._saved_step == self.counters.step or not self.main:
            self._saved_step = self.counters.step
            return
        self._save(LAST_FILE)
        state = {
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "counters": dataclasses.asdict(self.counters),
            "step": self.counters.step,
            "log_window": dict(self._window),  # the sums of the next log record, so far
            "rng": rng_state(),
        }
        save_state(self.dir / STATE_FILE, state)
        self._saved_step = self.counters.step

    def _save(self, name: str) -> Path:
        """Write the weights, their lineage extended by this run so far (``checkpoints.lineage``)."""
        cfg, counters = self.config, self.counters
        records = self.history.records if self.history is not None else []
        run = run_record(
            cfg.name,
            cfg.init,
            records,
            steps=counters.step,
            train_s=counters.elapsed_s,
            setup_s=counters.setup_s,
        )
        self.model.lineage = [*self.lineage, run]
        return save_weights(self.model, self.dir / name)

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.counters = _Counters(**state["counters"])
        self._window, self._saved_step = dict(state["log_window"]), self.counters.step
        restore_rng(state["rng"])
        logger.info("resumed %s at step %d", self.dir, self.counters.step)

    def _over_budget(self) -> bool:
        budget = self.config.time_budget_minutes
        if budget is None:
            return False
        # keep room for the final validation, as long as the last one took
        spent = self.counters.elapsed_s + self.counters.val_seconds >= 60 * budget
        return distributed.broadcast_flag(spent)  # rank 0's clock decides for every rank

    def _finish(self, stopped: bool) -> TrainResult:
        self._validate()
        self._tick()
        self._checkpoint()
        if self.history is not None:
            self.history.plot(self.dir / CURVES_FILE)
        distributed.barrier()  # every rank returns once rank 0's files are written
        counters = self.counters
        best = self.dir / BEST_FILE
        return TrainResult(
            out_dir=self.dir,
            steps=counters.step,
            stopped_early=stopped,
            elapsed_s=counters.elapsed_s,
            val_dice=dict(counters.val_dice),
            best_dice=counters.best_dice,
            best_step=counters.best_step,
            best_path=best if best.is_file() else None,
            last_path=self.dir / LAST_FILE,
            state_path=self.dir / STATE_FILE,
        )


@dataclass(frozen=True)
class _Teaching:
    """The teacher whose masks the model also learns, and the weight of that term. Not a module, so DDP
    neither wraps nor broadcasts the teacher."""

    teacher: nn.Module
    weight: float
    focus: float = 0.0

    def divergence(self, group: dict[str, torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
        """The mask divergence of the model's (B, 1, S, S) ``logits`` from the teacher's on ``group``."""
        if "teacher_features" in group:
            group = {**group, "features": group["teacher_features"]}
        with torch.no_grad():
            target = forward_group(self.teacher, group).masks.float()
        return mask_divergence(logits.float(), target, self.focus)


class _StepLoss(nn.Module):
    """The model and the loss over a batch's same-size groups: the module DDP wraps, so that one forward
    covers a rank's whole share. Per group: ``total``, ``dice``, ``focal``, ``patch`` (float32 scalars),
    with a teacher also ``teacher``, and the detached (B, 1, S, S) mask ``logits``."""

    def __init__(
        self,
        model: nn.Module,
        loss: SegmentationLoss,
        device: torch.device,
        bf16: bool,
        teaching: _Teaching | None = None,
    ) -> None:
        super().__init__()
        self.model, self.loss, self.device, self.bf16 = model, loss, device, bf16
        self.teaching = teaching

    def forward(self, groups: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        outputs = []
        for group in groups:
            with autocast(self.device, self.bf16):
                output = forward_group(self.model, group)
                taught = self.teaching.divergence(group, output.masks) if self.teaching else None
            parts = self.loss(output.masks, group["mask"], output.patch_logits)
            out = {"total": parts.total, "dice": parts.dice, "focal": parts.focal, "patch": parts.patch}
            if taught is not None:
                out |= {"total": parts.total + self.teaching.weight * taught, "teacher": taught}
            outputs.append(out | {"logits": output.masks.detach()})
        return outputs


def _weighted(loss: torch.Tensor, weight: float, groups: int) -> torch.Tensor:
    return loss * weight if groups > 1 else loss


def _metric_sums(
    outputs: list[dict[str, torch.Tensor]], groups: list[dict[str, torch.Tensor]], weights: list[float]
) -> dict[str, float]:
    """The batch's weighted loss parts and train Dice; under torchrun the means of the ranks' values
    (equal shares: the global batch's)."""
    sums: dict[str, float] = {}
    for out, group, weight in zip(outputs, groups, weights, strict=True):
        values = {
            "loss": out["total"].item(),
            "dice_loss": out["dice"].item(),
            "focal_loss": out["focal"].item(),
            "patch_loss": out["patch"].item(),
            "train_dice": _batch_dice(out["logits"], group["mask"]),
        }
        if "teacher" in out:
            values["teacher_loss"] = out["teacher"].item()
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + weight * value
    if not distributed.is_distributed():
        return sums
    reduced = distributed.all_reduce_sum(torch.tensor(list(sums.values()), dtype=torch.float64))
    return dict(zip(sums, (reduced / distributed.world_size()).tolist(), strict=True))


def _check_resumable(config: TrainConfig, saved: TrainConfig) -> None:
    new, old = config.to_dict(), saved.to_dict()
    changed = [k for k in new if new[k] != old[k] and k not in RESUMABLE_CHANGES]
    if changed:
        raise ConfigError(
            f"cannot resume with a different config: {', '.join(changed)} changed "
            f"(only {', '.join(RESUMABLE_CHANGES)} may)"
        )


def _batch_dice(logits: torch.Tensor, masks: torch.Tensor) -> float:
    """Mean hard Dice over the batch of (B, 1, S, S) logits vs 0/1 masks (1 when both are empty)."""
    predicted, truth = logits.float() > 0, masks > 0.5
    intersection = (predicted & truth).flatten(1).sum(1).float()
    total = (predicted.flatten(1).sum(1) + truth.flatten(1).sum(1)).float()
    dice = torch.where(total > 0, 2 * intersection / total.clamp_min(1), torch.ones_like(total))
    return float(dice.mean())


def _mean(scores: dict[str, float]) -> float:
    return sum(scores.values()) / len(scores)
