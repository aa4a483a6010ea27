"""Training with a frozen shared encoder: each image's embedding is computed once per augmentation
variant and kept on disk, and training runs the refiner, SPPG and QDMD alone on the stored embeddings.

Variant 0 is the image as inference sees it; variants 1..N-1 are draws of
``data.transforms.appearance_augmentation`` seeded by (seed, variant, image content), so a rebuilt or
resumed cache holds the same samples. Each entry is one ``.npz`` (written atomically, so an interrupted
build resumes with the missing entries): the float16 (C, S/s, S/s) embedding, the (S, S) mask at input
size and the valid (unpadded) region. The cache folder is named after the encoder's weights, the input
normalisation and this module's sample recipe, so a different encoder never reads another's entries.

With the encoder frozen, one epoch costs a decoder pass instead of a whole-model pass (at LiteMedSAM's
pointwise stem the encoder is ~90 % of the forward cost and all of the memory).

With a frozen *prefix* (``frozen_prefix``: the stem and the first stages) the entries hold that prefix's
(h, w, C) output features and the (3, S, S) model input instead of the embedding; training then runs the
later stages, their controllers, the neck and the decoder (with its detail branch) on them. The folder's
name then covers the prefix's depth and weights alone, so training the later stages never invalidates it.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from espmedsam.data.dataset import SegmentationFolder
from espmedsam.data.training_set import FolderEpochs
from espmedsam.data.transforms import appearance_augmentation, reseed, to_model_input
from espmedsam.device import autocast
from espmedsam.distill.cache import CacheKey, EmbeddingCache, weights_fingerprint
from espmedsam.files import atomic_write
from espmedsam.modalities import MODALITIES
from espmedsam.models.espmedsam import ESPMedSAM
from espmedsam.train import distributed

RECIPE_VERSION = "appearance-v1"  # bump when the variant recipe changes: it names the cache folder
DEFAULT_CACHE = Path.home() / ".cache" / "espmedsam" / "encoder-embeddings"


def encoder_fingerprint(model: ESPMedSAM, depth: int | None = None) -> str:
    """16 hex digits over the encoder's config and weights, the input normalisation and the recipe; with
    ``depth``, over the frozen prefix of that many stages (``TinyViT.prefix``) alone."""
    config = model.config
    described: tuple = (config.encoder, config.input_normalisation, RECIPE_VERSION)
    if depth is not None:
        described += ("prefix", depth)
    tensors = [
        (name, tensor)
        for name, tensor in sorted(model.image_encoder.state_dict().items())
        # the cache holds controller-free embeddings
        if (depth is None or _in_prefix(name, depth)) and ".controllers." not in name
    ]
    return weights_fingerprint(described, tensors)


def _in_prefix(name: str, depth: int) -> bool:
    """Whether encoder parameter ``name`` belongs to the stem or the first ``depth`` stages."""
    if name.startswith("patch_embed."):
        return True
    parts = name.split(".")
    return parts[0] == "layers" and int(parts[1]) < depth


def sample_digest(image: np.ndarray, mask: np.ndarray) -> str:
    """SHA-256 of an image/mask pair's pixels and shapes."""
    digest = hashlib.sha256(repr((image.shape, mask.shape)).encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    digest.update(np.packbits(np.ascontiguousarray(mask > 0)).tobytes())
    return digest.hexdigest()


class EncoderCache(EmbeddingCache):
    """Embedding/mask entries of one frozen encoder under ``root/<fingerprint>``, in the teacher cache's
    layout, one ``.npz`` per (image content, input size, variant)."""

    suffix = ".npz"

    def get(self, key: CacheKey) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """{"embedding": (C, h, w)} or, of a frozen prefix, {"features": (h, w, C), "image": (3, S, S)},
        float32; with "mask": (1, S, S) float32 and "valid": (2,) int64."""
        with np.load(self.path(key)) as entry:
            out = {
                name: torch.from_numpy(entry[name].astype(np.float32))
                for name in _FEATURE_KEYS
                if name in entry
            }
            out["mask"] = torch.from_numpy(entry["mask"].astype(np.float32))[None]
            out["valid"] = torch.from_numpy(entry["valid"].astype(np.int64))
        return out

    def features(self, key: CacheKey) -> torch.Tensor:
        """The frozen prefix's (h, w, C) features of an entry alone, float32 (its image and mask unread)."""
        with np.load(self.path(key)) as entry:
            return torch.from_numpy(entry["features"].astype(np.float32))

    def put(self, key: CacheKey, entry: dict[str, torch.Tensor]) -> Path:  # type: ignore[override]
        buffer = io.BytesIO()
        arrays = {
            name: entry[name].detach().to(torch.float16).cpu().numpy()
            for name in _FEATURE_KEYS
            if name in entry
        }
        np.savez(
            buffer, **arrays, mask=entry["mask"][0].cpu().numpy() > 0.5, valid=entry["valid"].cpu().numpy()
        )
        return atomic_write(self.path(key), lambda file: file.write(buffer.getvalue()))


_FEATURE_KEYS = ("embedding", "features", "image")  # stored as float16


def variant_input(
    model: ESPMedSAM, image: np.ndarray, mask: np.ndarray, size: int, variant: int, seed: int, digest: str
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """The (3, S, S) input, (1, S, S) mask and valid region of one variant of a pair, for ``model``."""
    if variant:
        augmentation = appearance_augmentation(size)
        item_seed = np.random.SeedSequence([seed, variant, int(digest[:15], 16)]).generate_state(1)[0]
        reseed(augmentation, int(item_seed))
        out = augmentation(image=np.ascontiguousarray(image), mask=mask.astype(np.uint8))
        image, mask = out["image"], out["mask"]
    config = model.config
    return to_model_input(image, mask, size, config.pixel_mean, config.pixel_std, config.input_normalisation)


class CachedEmbeddingSet(FolderEpochs, Dataset):
    """Folders x variants of cached embeddings; the variant of item ``i`` in an epoch is drawn from
    (seed, epoch, i) among its folder's ``variants``. Items: {"embedding", "mask", "valid", "modality",
    "dataset"}; of a frozen prefix (``depth``), "features", "image" and "depth" instead of "embedding";
    with ``teacher_cache`` (another model's prefix on the same samples), also "teacher_features"."""

    def __init__(
        self,
        cache: EncoderCache,
        folders: Sequence[SegmentationFolder],
        sizes: Sequence[int],
        variants: int | Sequence[int],
        seed: int = 0,
        modalities: Sequence[str] = MODALITIES,
        depth: int | None = None,
    ) -> None:
        self.cache, self.folders, self.sizes = cache, list(folders), list(sizes)
        self.modalities = tuple(modalities)  # the model's: items carry ids into it
        self.depth = depth  # None: whole-encoder embeddings; else the frozen prefix's stage count
        counts = [variants] * len(self.folders) if isinstance(variants, int) else list(variants)
        self.folder_variants, self.seed, self.epoch = counts, seed, 0
        self._items = [(f, i) for f, folder in enumerate(self.folders) for i in range(len(folder))]
        self.digests = [sample_digest(*_pair(self.folders[f][i])) for f, i in self._items]
        self.teacher_cache: EncoderCache | None = None  # set by ``pair_with_teacher``

    def __len__(self) -> int:
        return len(self._items)

    def variant_of(self, index: int) -> int:
        count = self.folder_variants[self._items[index][0]]
        if count == 1:
            return 0
        state = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0]
        return int(state % count)

    def __getitem__(self, index: int) -> dict[str, Any]:
        which, _ = self._items[index]
        key = CacheKey(self.digests[index], self.sizes[which], self.variant_of(index))
        entry = self.cache.get(key)
        modality = self.modalities.index(self.folders[which].modality)
        item = {**entry, "modality": torch.tensor(modality), "dataset": torch.tensor(which)}
        if self.depth is not None:
            item["depth"] = torch.tensor(self.depth)
        if self.teacher_cache is not None:
            item["teacher_features"] = self.teacher_cache.features(key)
        return item

    def pair_with_teacher(self, teacher_set: CachedEmbeddingSet) -> None:
        """Give each item the features of ``teacher_set`` (the same folders, sizes, variants and seed,
        cached by another model's prefix) for the same sample, as "teacher_features"."""
        if teacher_set.jobs() != self.jobs() or teacher_set.depth != self.depth:
            raise ValueError("the teacher's cached set must hold the same samples at the same depth")
        self.teacher_cache = teacher_set.cache

    def jobs(self) -> list[tuple[int, CacheKey]]:
        """(item index, cache key) of every entry the folders' variants need."""
        return [
            (i, CacheKey(self.digests[i], self.sizes[f], v))
            for i, (f, _) in enumerate(self._items)
            for v in range(self.folder_variants[f])
        ]

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        which, within = self._items[index]
        image, mask = _pair(self.folders[which][within])
        return image, mask, self.digests[index]


def _pair(sample: Any) -> tuple[np.ndarray, np.ndarray]:
    return sample.image, sample.mask


def build_cache(
    model: ESPMedSAM,
    dataset: CachedEmbeddingSet,
    *,
    seed: int,
    batch_size: int = 4,
    bf16: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Embed every missing (item, variant) of ``dataset`` with the controller-free encoder (or its
    frozen prefix, ``dataset.depth``); returns the number computed. Same-size inputs are batched; the
    encoder runs in eval mode under ``no_grad``.

    Under torchrun every rank calls this and embeds every N-th batch (the batches of one process, so the
    same entries); all return once every entry is written. ``progress`` counts this rank's share.
    """
    todo = [(index, key) for index, key in dataset.jobs() if key not in dataset.cache]

    def embed(chunk: Sequence[tuple[int, CacheKey]]) -> int:
        return _embed_chunk(model, dataset, list(chunk), seed=seed, bf16=bf16)

    def missing() -> list[list[tuple[int, CacheKey]]]:
        left = [(index, key) for index, key in todo if key not in dataset.cache]
        return _same_size_chunks(left, batch_size)

    was_training = model.training
    model.eval()
    try:
        distributed.fill_together(_same_size_chunks(todo, batch_size), embed, missing, progress)
    finally:
        model.train(was_training)
    return len(todo)


def _same_size_chunks(todo: list[tuple[int, CacheKey]], batch_size: int) -> list[list[tuple[int, CacheKey]]]:
    """Batches of at most ``batch_size`` jobs of one input size, smaller sizes first."""
    return [
        group[start : start + batch_size]
        for size in sorted({key.size for _, key in todo})
        for group in [[job for job in todo if job[1].size == size]]
        for start in range(0, len(group), batch_size)
    ]


def _embed_chunk(
    model: ESPMedSAM, dataset: CachedEmbeddingSet, chunk: list[tuple[int, CacheKey]], *, seed: int, bf16: bool
) -> int:
    """Embed and store one batch of same-size (item index, cache key) jobs."""
    device = model.pixel_mean.device
    inputs = [
        variant_input(model, *dataset.sample(i)[:2], key.size, key.variant, seed, key.digest)
        for i, key in chunk
    ]
    images = torch.stack([x for x, _, _ in inputs]).to(device)
    with torch.no_grad(), autocast(device, bf16):
        if dataset.depth is None:
            outputs = [{"embedding": e} for e in model.encode(images, None)]
        else:
            features = model.image_encoder.prefix(images, dataset.depth, None)
            outputs = [{"features": f, "image": x} for f, x in zip(features, images, strict=True)]
    for (_, key), (_, mask, valid), output in zip(chunk, inputs, outputs, strict=True):
        dataset.cache.put(key, {**output, "mask": mask, "valid": torch.tensor(valid)})
    return len(chunk)
