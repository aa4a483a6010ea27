"""Training the click decoder (``models/click_decoder.py``) with simulated clicks: ``prompts train-clicks``.

The protocol is the interactive-segmentation papers' (and ``benchmarks/prompt_correction.py``'s): start
from the prompt-free mask, click at the centre of the largest error region (foreground where the mask
missed the object, background where it spilled over), decode with every click so far and the mask so far,
and repeat. Training follows SAM's recipe for it: each step draws 1 to ``max_clicks`` clicks; the passes
before the last run without gradients, and the loss (Dice + focal on the corrected mask, MSE of the IoU
head against the corrected mask's true IoU) is taken after the last. Half the training clicks are drawn
at random inside the largest error region instead of at its centre, so the decoder does not learn one
click position only.

Everything but the click decoder is frozen, so each image's embedding and prompt-free logits are computed
once, before training, and kept in memory (float16): a step costs a few decoder passes. Where
``espmedsam train`` has cached the frozen encoder prefix's features of the images (``train/frozen.py``),
the embedding pass reads them and runs only the later stages.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from espmedsam.data.dataset import DatasetSource, SegmentationFolder
from espmedsam.data.sampler import indices_by_size, same_size_batches
from espmedsam.data.transforms import to_model_input
from espmedsam.device import autocast
from espmedsam.distill.cache import CacheKey, EmbeddingCache, weights_fingerprint
from espmedsam.errors import InputError
from espmedsam.files import atomic_write
from espmedsam.losses import MaskLoss
from espmedsam.models.click_decoder import ClickDecoder
from espmedsam.models.espmedsam import ESPMedSAM
from espmedsam.models.self_prompt import refit_clicked
from espmedsam.train.frozen import DEFAULT_CACHE, EncoderCache, encoder_fingerprint, sample_digest
from espmedsam.train.quality import dice_score

logger = logging.getLogger(__name__)

NO_CLICK = -1  # the prompt encoder's padding label: an image of the batch with nothing left to correct


@dataclass(frozen=True)
class ClickSample:
    """One image as the click decoder sees it, in model-input pixels (float16 to fit many in memory)."""

    embedding: torch.Tensor  # (C, h, w) the encoder's, the modality's controllers included
    logits: torch.Tensor  # (1, S, S) the prompt-free mask's logits
    truth: np.ndarray  # (S, S) bool, the ground truth resized as the image was
    valid: tuple[int, int]  # the unpadded region (h, w) at the top left
    dataset: str
    modality: str

    @property
    def size(self) -> int:
        return self.truth.shape[-1]


def largest_error_region(mask: np.ndarray, truth: np.ndarray) -> np.ndarray | None:
    """The largest connected region, (H, W) bool, where ``mask`` and ``truth`` (both (H, W) bool)
    disagree; None when they agree everywhere."""
    errors = mask != truth
    regions, count = ndimage.label(errors)
    if not count:
        return None
    largest = 1 + int(np.argmax(ndimage.sum(errors, regions, range(1, count + 1))))
    return regions == largest


def next_click(
    mask: np.ndarray, truth: np.ndarray, rng: np.random.Generator | None = None
) -> tuple[int, int, int] | None:
    """(x, y, label) of the next simulated click on the largest connected error region of ``mask`` against
    ``truth`` (both (H, W) bool): the pixel farthest from the region's border, or with ``rng`` a pixel
    drawn uniformly from the region; label 1 where the mask missed the object, 0 where it spilled over.
    None when the mask has no error."""
    region = largest_error_region(mask, truth)
    if region is None:
        return None
    if rng is None:
        inside = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
        y, x = np.unravel_index(int(np.argmax(inside)), inside.shape)
    else:
        ys, xs = np.nonzero(region)
        pick = int(rng.integers(len(ys)))
        y, x = ys[pick], xs[pick]
    return int(x), int(y), int(truth[y, x])


@dataclass(frozen=True)
class PrefixCache:
    """A training cache of the model's frozen encoder prefix: the first ``depth`` stages' output."""

    cache: EncoderCache
    depth: int


def find_prefix_cache(model: ESPMedSAM, root: str | Path = DEFAULT_CACHE) -> PrefixCache | None:
    """The deepest frozen-prefix cache under ``root`` built from this model's encoder weights, if any.
    Only prefixes without controllers qualify (the cache holds controller-free features)."""
    controller = model.config.controller
    deepest = len(model.image_encoder.layers) - 1
    if controller.enabled:
        deepest = min(deepest, controller.first_stage)
    for depth in range(deepest, 0, -1):
        cache = EncoderCache(root, encoder_fingerprint(model, depth))
        if cache.dir.is_dir():
            return PrefixCache(cache, depth)
    return None


CLICK_SAMPLE_CACHE = DEFAULT_CACHE.parent / "click-samples"


class ClickSampleCache(EmbeddingCache):
    """The click samples (embedding, prompt-free logits, truth, valid region) of one model's prompt-free
    path under ``root/<fingerprint>``, one ``.npz`` per (image content, input size), so that training the
    click decoder again on the same weights skips the embedding pass."""

    suffix = ".npz"

    @classmethod
    def for_model(cls, model: ESPMedSAM, root: str | Path | None = None) -> ClickSampleCache:
        """The cache of ``model``'s samples under ``root`` (default ``CLICK_SAMPLE_CACHE``)."""
        return cls(CLICK_SAMPLE_CACHE if root is None else root, prompt_free_fingerprint(model))

    def get(self, key: CacheKey) -> dict[str, np.ndarray]:  # type: ignore[override]
        with np.load(self.path(key)) as entry:
            return {name: entry[name] for name in ("embedding", "logits", "truth", "valid")}

    def put(self, key: CacheKey, sample: ClickSample) -> Path:  # type: ignore[override]
        buffer = io.BytesIO()
        np.savez(
            buffer, embedding=sample.embedding.numpy(), logits=sample.logits.numpy(), truth=sample.truth,
            valid=np.array(sample.valid),
        )  # fmt: skip
        return atomic_write(self.path(key), lambda file: file.write(buffer.getvalue()))


def prompt_free_fingerprint(model: ESPMedSAM) -> str:
    """16 hex digits over every weight but the click decoder's, the input normalisation and the modalities'
    order: what a click sample's embedding and prompt-free logits depend on beside its input size (in the
    cache key)."""
    config = model.config
    described = (config.input_normalisation, config.pixel_mean, config.pixel_std, config.modalities)
    tensors = [(k, v) for k, v in sorted(model.state_dict().items()) if not k.startswith("click_decoder.")]
    return weights_fingerprint(described, tensors)


def prepare_samples(
    model: ESPMedSAM,
    sources: Sequence[DatasetSource],
    split: str,
    *,
    max_per_dataset: int | None = None,
    batch_size: int = 8,
    bf16: bool = True,
    prefix: PrefixCache | None = None,
    cache: ClickSampleCache | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[ClickSample]:
    """Embed and segment (prompt-free) the images of ``split`` in each dataset, at each modality's input
    size; at most ``max_per_dataset`` per dataset (the first ones: the splits are shuffled already).
    Batches whose images are all in ``cache`` are read from it, the others are made and stored there;
    those whose images are all in ``prefix`` start from its features. ``progress`` is called with the
    number of images done after each batch."""
    samples: list[ClickSample] = []
    for source in sources:
        folder = SegmentationFolder(source, split)
        size = model.input_size(folder.modality)
        count = len(folder) if max_per_dataset is None else min(len(folder), max_per_dataset)
        for start in range(0, count, batch_size):
            indices = range(start, min(count, start + batch_size))
            samples += _cached_batch(model, folder, indices, size, bf16, prefix, cache)
            if progress is not None:
                progress(min(count, start + batch_size) - start)
    if not samples:
        raise InputError(f"no {split} images in the given datasets")
    return samples


def _cached_batch(
    model: ESPMedSAM,
    folder: SegmentationFolder,
    indices: range,
    size: int,
    bf16: bool,
    prefix: PrefixCache | None,
    cache: ClickSampleCache | None,
) -> list[ClickSample]:
    pairs = [folder[i] for i in indices]
    keys = [CacheKey(sample_digest(s.image, s.mask), size, 0) for s in pairs]
    missing = set(keys) if cache is None else set(cache.missing(keys))
    if not missing:
        return [_read_sample(cache.get(key), folder) for key in keys]
    samples = _embed_batch(model, folder, pairs, keys, size, bf16, prefix)
    if cache is not None:  # only the new entries: those kept already hold the same sample
        for key, sample in zip(keys, samples, strict=True):
            if key in missing:
                cache.put(key, sample)
    return samples


def _read_sample(entry: dict, folder: SegmentationFolder) -> ClickSample:
    valid = (int(entry["valid"][0]), int(entry["valid"][1]))
    embedding, logits = torch.from_numpy(entry["embedding"]), torch.from_numpy(entry["logits"])
    return ClickSample(embedding, logits, entry["truth"], valid, folder.name, folder.modality)


def _embed_batch(
    model: ESPMedSAM,
    folder: SegmentationFolder,
    pairs: list,
    keys: list[CacheKey],
    size: int,
    bf16: bool,
    prefix: PrefixCache | None,
) -> list[ClickSample]:
    device = model.pixel_mean.device
    entries = None
    if prefix is not None and all(key in prefix.cache for key in keys):
        entries = [prefix.cache.get(key) for key in keys]
        inputs = [(e["image"], e["mask"], (int(e["valid"][0]), int(e["valid"][1]))) for e in entries]
    else:
        config = model.config
        norm = (config.pixel_mean, config.pixel_std, config.input_normalisation)
        inputs = [to_model_input(s.image, s.mask > 0, size, *norm) for s in pairs]
    images = torch.stack([x for x, _, _ in inputs]).to(device)
    with torch.inference_mode(), autocast(device, bf16):
        if entries is not None and prefix is not None:
            features = torch.stack([e["features"] for e in entries]).to(device)
            ids = model.modality_ids(folder.modality, len(pairs)).to(device)
            embeddings = model.image_encoder.suffix(features, prefix.depth, model.route(ids))
        else:
            embeddings = model.encode(images, folder.modality)
        logits = model.decode(embeddings, folder.modality, size, images).masks
    return [
        ClickSample(e.half().cpu(), m.half().cpu(), t[0].numpy() > 0.5, valid, folder.name, folder.modality)
        for e, m, (_, t, valid) in zip(embeddings, logits, inputs, strict=True)
    ]


@dataclass(frozen=True)
class ClickScores:
    """Mean Dice (in the valid region, model-input pixels) after 0, 1, ..., k clicks, per dataset."""

    per_dataset: dict[str, tuple[float, ...]]

    @property
    def mean(self) -> tuple[float, ...]:
        """Mean over the datasets, after 0, 1, ..., k clicks."""
        return tuple(float(np.mean(v)) for v in zip(*self.per_dataset.values(), strict=True))


@dataclass(frozen=True)
class ClickTraining:
    """How a click-decoder training went."""

    steps: int
    seconds: float
    best_step: int
    history: list[dict]  # one row per validation: step, loss, mean Dice after 0..k clicks
    best: ClickScores


class _Batches:
    """Random same-size batches of the training samples, a size drawn in proportion to its images."""

    def __init__(self, samples: Sequence[ClickSample], batch_size: int, rng: np.random.Generator) -> None:
        self.by_size = indices_by_size([s.size for s in samples])
        self.sizes = sorted(self.by_size)
        counts = np.array([len(self.by_size[s]) for s in self.sizes], dtype=np.float64)
        self.weights = counts / counts.sum()
        self.batch_size, self.rng = batch_size, rng

    def draw(self) -> list[int]:
        size = self.sizes[int(self.rng.choice(len(self.sizes), p=self.weights))]
        pool = self.by_size[size]
        return [pool[i] for i in self.rng.choice(len(pool), min(self.batch_size, len(pool)), replace=False)]


def clicks_to_tensors(clicks: list[list[tuple[int, int, int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image its clicks so far, (x, y, label) in model-input pixels -> (B, P, 2) points and (B, P)
    labels, shorter lists padded with ``NO_CLICK`` (an image with none gets one padding point)."""
    longest = max(1, max(len(c) for c in clicks))
    points = torch.zeros(len(clicks), longest, 2)
    labels = torch.full((len(clicks), longest), NO_CLICK, dtype=torch.int64)
    for i, image_clicks in enumerate(clicks):
        for j, (x, y, label) in enumerate(image_clicks):
            points[i, j] = torch.tensor([float(x), float(y)])
            labels[i, j] = label
    return points, labels


def valid_masks(logits: torch.Tensor, samples: Sequence[ClickSample]) -> list[np.ndarray]:
    """(B, 1, S, S) logits -> each image's bool mask with the padding cleared."""
    masks = (logits[:, 0] > 0).cpu().numpy()
    for mask, sample in zip(masks, samples, strict=True):
        h, w = sample.valid
        mask[h:, :] = False
        mask[:, w:] = False
    return list(masks)


def _add_clicks(
    clicks: list[list[tuple[int, int, int]]],
    masks: Sequence[np.ndarray],
    samples: Sequence[ClickSample],
    rng: np.random.Generator | None,
    random_share: float = 0.5,
) -> None:
    for image_clicks, mask, sample in zip(clicks, masks, samples, strict=True):
        drawn = rng is not None and rng.random() < random_share
        click = next_click(mask, sample.truth, rng if drawn else None)
        if click is not None:
            image_clicks.append(click)


def _stack(samples: Sequence[ClickSample], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    embeddings = torch.stack([s.embedding for s in samples]).to(device, torch.float32)
    logits = torch.stack([s.logits for s in samples]).to(device, torch.float32)
    return embeddings, logits


def evaluate_clicks(
    model: ESPMedSAM,
    samples: Sequence[ClickSample],
    max_clicks: int = 3,
    *,
    batch_size: int = 8,
    bf16: bool = True,
) -> ClickScores:
    """Mean Dice per dataset after 0..``max_clicks`` centre clicks (the benchmark's protocol: an image
    with no error left gets no further click and keeps its mask), in model-input pixels."""
    dice: dict[str, list[list[float]]] = {}
    rows = click_dice(model, samples, max_clicks, batch_size=batch_size, bf16=bf16)
    for sample, row in zip(samples, rows, strict=True):
        dice.setdefault(sample.dataset, []).append(row)
    return ClickScores({name: tuple(np.mean(rows, axis=0).tolist()) for name, rows in dice.items()})


def click_dice(
    model: ESPMedSAM,
    samples: Sequence[ClickSample],
    max_clicks: int = 3,
    *,
    refit: bool = False,
    batch_size: int = 8,
    bf16: bool = True,
) -> list[list[float]]:
    """Per sample, its Dice after 0..``max_clicks`` centre clicks (``evaluate_clicks``' protocol); with
    ``refit``, each foreground click's object is redrawn from its box after the click decoder's pass (as
    ``Predictor.predict`` does on the modalities in ``config.prompt.refit_clicked``)."""
    device = model.pixel_mean.device
    rows: dict[int, list[float]] = {}
    for indices in same_size_batches([s.size for s in samples], batch_size):
        chosen = [samples[i] for i in indices]
        embeddings, logits = _stack(chosen, device)
        clicks: list[list[tuple[int, int, int]]] = [[] for _ in chosen]
        masks = valid_masks(logits, chosen)
        batch_rows = [[dice_score(m, s.truth)] for m, s in zip(masks, chosen, strict=True)]
        for _ in range(max_clicks):
            before = [len(c) for c in clicks]
            _add_clicks(clicks, masks, chosen, None)
            clicked = [len(c) > b for c, b in zip(clicks, before, strict=True)]
            if any(clicked):
                points, labels = clicks_to_tensors(clicks)
                with torch.inference_mode(), autocast(device, bf16):
                    out = model.decode_clicks(
                        embeddings, chosen[0].size, points.to(device), labels.to(device), logits
                    )
                    corrected = out.masks.float()
                    if refit:
                        corrected = _refit_foreground(model, embeddings, corrected, chosen, clicks, clicked)
                taken = torch.tensor(clicked, device=device)[:, None, None, None]
                logits = torch.where(taken, corrected, logits)
                masks = valid_masks(logits, chosen)
            for row, mask, sample in zip(batch_rows, masks, chosen, strict=True):
                row.append(dice_score(mask, sample.truth))
        rows.update(zip(indices, batch_rows, strict=True))
    return [rows[i] for i in range(len(samples))]


def _refit_foreground(
    model: ESPMedSAM,
    embeddings: torch.Tensor,
    corrected: torch.Tensor,
    chosen: Sequence[ClickSample],
    clicks: list[list[tuple[int, int, int]]],
    clicked: list[bool],
) -> torch.Tensor:
    """(B, 1, S, S) ``corrected`` with the object of each image's new foreground click redrawn."""
    out = corrected.clone()
    for j, sample in enumerate(chosen):
        if clicked[j] and clicks[j][-1][2] == 1:
            x, y, _ = clicks[j][-1]
            decoder = model.box_decoder(embeddings[j : j + 1], sample.size)
            out[j : j + 1] = refit_clicked(corrected[j : j + 1], sample.valid, x, y, decoder).to(out.device)
    return out


@dataclass(frozen=True)
class RefitGain:
    """What redrawing each clicked object from its box (``models/self_prompt.py``, ``refit_clicked``)
    did to one modality's validation Dice after 1..N clicks."""

    modality: str
    images: int
    clicked: tuple[float, ...]  # mean Dice after 1..N clicks, the click decoder's masks as they are
    refit: tuple[float, ...]  # the same with each foreground click's object redrawn from its box

    @property
    def gain(self) -> float:
        """The Dice it added, averaged over 1..N clicks: it acts after every foreground click."""
        return float(np.mean(np.subtract(self.refit, self.clicked)))


def refit_gains(
    model: ESPMedSAM, samples: Sequence[ClickSample], max_clicks: int = 3, *, bf16: bool = True
) -> list[RefitGain]:
    """Per modality: mean validation Dice after 1..``max_clicks`` of the benchmark's clicks, with the
    click decoder's masks as they are and with each foreground click's object redrawn from its box."""
    plain = click_dice(model, samples, max_clicks, bf16=bf16)
    refitted = click_dice(model, samples, max_clicks, refit=True, bf16=bf16)
    by_modality: dict[str, list[int]] = {}
    for i, sample in enumerate(samples):
        by_modality.setdefault(sample.modality, []).append(i)
    return [
        RefitGain(
            name,
            len(indices),
            tuple(np.mean([plain[i][1:] for i in indices], axis=0).tolist()),
            tuple(np.mean([refitted[i][1:] for i in indices], axis=0).tolist()),
        )
        for name, indices in by_modality.items()
    ]


def train_clicks(
    model: ESPMedSAM,
    train: Sequence[ClickSample],
    val: Sequence[ClickSample],
    *,
    steps: int = 1000,
    minutes: float | None = None,
    batch_size: int = 8,
    lr: float = 1e-4,
    max_clicks: int = 3,
    val_every: int = 100,
    seed: int = 0,
    bf16: bool = True,
    random_share: float = 0.5,
    select_after: int | None = None,
    shifted_share: float = 0.0,
    max_shift: float = 4.0,
    progress: Callable[[int, dict], None] | None = None,
) -> ClickTraining:
    """Train ``model.click_decoder`` in place (every other weight is frozen) for ``steps`` steps or
    ``minutes``, whichever ends first, with a cosine learning rate; validate every ``val_every`` steps
    and keep the weights with the best mean Dice after ``select_after`` clicks (default ``max_clicks``;
    the decoder it starts with is the first candidate). ``random_share`` of the simulated clicks fall on
    a random pixel of the largest error region, the others at its centre (the benchmark's click).
    ``shifted_share`` of the training corrections start from the prompt-free logits plus an offset drawn
    from [-max_shift, max_shift] (see ``shift_logits``). ``progress(step, row)`` after each step."""
    if model.click_decoder is None:
        raise InputError("the model has no click decoder (with_click_decoder adds one)")
    decoder = model.click_decoder
    chosen_after = max_clicks if select_after is None else select_after
    if not 1 <= chosen_after <= max_clicks:
        raise InputError(f"select_after must lie in 1..{max_clicks}, got {chosen_after}")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    batches = _Batches(train, batch_size, rng)
    optimiser = torch.optim.AdamW(decoder.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
    )
    mask_loss = MaskLoss()
    # no draws at a share of 0, so a run without shifts repeats the batches and clicks of earlier runs
    shift = ClickShift(shifted_share, max_shift, rng) if shifted_share > 0 else None
    best = evaluate_clicks(model, val, max_clicks, bf16=bf16)
    best_state, best_step = copy.deepcopy(decoder.state_dict()), 0
    history = [{"step": 0, "loss": None, "dice": list(best.mean)}]
    start, step, losses = time.monotonic(), 0, []
    while step < steps and (minutes is None or time.monotonic() - start < 60 * minutes):
        decoder.train()
        chosen = [train[i] for i in batches.draw()]
        clicks_now = int(rng.integers(1, max_clicks + 1))
        loss = _step(model, chosen, clicks_now, rng, mask_loss, bf16, random_share, shift)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        step += 1
        losses.append(loss.item())
        row = {"step": step, "loss": float(np.mean(losses[-val_every:]))}
        if step % val_every == 0 or step == steps:
            decoder.eval()
            scores = evaluate_clicks(model, val, max_clicks, bf16=bf16)
            row["dice"] = list(scores.mean)
            history.append(row)
            dice = ", ".join(f"{v:.4f}" for v in scores.mean)
            logger.info(
                "step %d, loss %.4f: val Dice after 0..%d clicks %s", step, row["loss"], max_clicks, dice
            )
            if scores.mean[chosen_after] > best.mean[chosen_after]:
                best, best_state, best_step = scores, copy.deepcopy(decoder.state_dict()), step
        if progress is not None:
            progress(step, row)
    decoder.load_state_dict(best_state)
    decoder.eval()
    return ClickTraining(step, time.monotonic() - start, best_step, history, best)


@dataclass
class ClickShift:
    """Draws the per-image logit offsets of ``shift_logits``: with probability ``share`` an offset uniform
    in [-max_shift, max_shift], else 0."""

    share: float
    max_shift: float
    rng: np.random.Generator

    def draw(self, count: int) -> np.ndarray:
        offsets = self.rng.uniform(-self.max_shift, self.max_shift, count)
        return np.where(self.rng.random(count) < self.share, offsets, 0.0)


def shift_logits(logits: torch.Tensor, offsets: np.ndarray) -> torch.Tensor:
    """(B, 1, S, S) prompt-free logits with each image's offset added.

    The model segments its own training images better than unseen ones, so their prompt-free masks show
    the click decoder smaller errors than it meets in use. An offset makes the mask so far miss (below 0)
    or spill over (above 0) everywhere at once, so that one click has to stand for all the regions that
    went wrong the same way, such as the faint nuclei a microscopy mask leaves out."""
    return logits + torch.as_tensor(offsets, dtype=logits.dtype, device=logits.device)[:, None, None, None]


def _step(
    model: ESPMedSAM,
    samples: Sequence[ClickSample],
    clicks_now: int,
    rng: np.random.Generator,
    mask_loss: MaskLoss,
    bf16: bool,
    random_share: float = 0.5,
    shift: ClickShift | None = None,
) -> torch.Tensor:
    """One training step's loss on a same-size batch with ``clicks_now`` simulated clicks."""
    device = model.pixel_mean.device
    decoder = model.click_decoder
    assert decoder is not None
    size = samples[0].size
    embeddings, logits = _stack(samples, device)
    if shift is not None:
        logits = shift_logits(logits, shift.draw(len(samples)))
    truth = torch.from_numpy(np.stack([s.truth for s in samples])).to(device)[:, None].float()
    clicks: list[list[tuple[int, int, int]]] = [[] for _ in samples]
    masks = valid_masks(logits, samples)
    for k in range(clicks_now):
        _add_clicks(clicks, masks, samples, rng, random_share)
        points, labels = clicks_to_tensors(clicks)
        last = k == clicks_now - 1
        with torch.set_grad_enabled(last), autocast(device, bf16):
            out = model.decode_clicks(embeddings, size, points.to(device), labels.to(device), logits)
        if not last:
            logits = out.masks.detach().float()
            masks = valid_masks(logits, samples)
    valid = torch.zeros_like(truth)
    for i, sample in enumerate(samples):
        valid[i, :, : sample.valid[0], : sample.valid[1]] = 1
    corrected = out.masks.float()
    # padding is neither object nor error: its logits are pushed to background with the truth there
    loss = mask_loss(corrected * valid + (valid - 1) * 20.0, truth)
    with torch.no_grad():
        predicted = (corrected > 0).float() * valid
        intersection = (predicted * truth).sum((1, 2, 3))
        union = ((predicted + truth) > 0).float().sum((1, 2, 3))
        iou = torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))
    return loss + F.mse_loss(out.iou.float(), iou)


def with_click_decoder(model: ESPMedSAM) -> ESPMedSAM:
    """``model`` with a click decoder started from its promptable decoder (see ``ClickDecoder``), if it
    has none yet; the config says so (``prompt.clicks``). Every other weight is untouched.

    Raises:
        InputError: a model without a promptable decoder.
    """
    import dataclasses

    if model.click_decoder is not None:
        return model
    if model.prompt_decoder is None:
        raise InputError("the model has no promptable decoder to start a click decoder from")
    config = model.config
    model.click_decoder = ClickDecoder.from_prompt_decoder(
        model.prompt_decoder, config.encoder.out_chans, config.decoder
    )
    model.config = dataclasses.replace(config, prompt=dataclasses.replace(config.prompt, clicks=True))
    return model


__all__ = [
    "ClickSample",
    "ClickScores",
    "ClickSampleCache",
    "ClickShift",
    "ClickTraining",
    "evaluate_clicks",
    "next_click",
    "prepare_samples",
    "shift_logits",
    "train_clicks",
    "with_click_decoder",
]
