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
from espmedsam.distill.cache import CacheKey, EmbeddingCache
from espmedsam.files import atomic_write
from espmedsam.modalities import MODALITIES
from espmedsam.models.espmedsam import ESPMedSAM
from espmedsam.train import distributed

RECIPE_VERSION = "appearance-v1"  # bump when the variant recipe changes: it names the cache folder
DEFAULT_CACHE = Path.home() / ".cache" / "espmedsam" / "encoder-embeddings"


def encoder_fingerprint(model: ESPMedSAM) -> str:
    """16 hex digits over the encoder's config and weights, the input normalisation and the recipe."""
    config = model.config
    digest = hashlib.sha256(repr((config.encoder, config.input_normalisation, RECIPE_VERSION)).encode())
    for name, tensor in sorted(model.image_encoder.state_dict().items()):
        if ".controllers." not in name:  # the cache holds controller-free embeddings
            digest.update(name.encode())
            digest.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


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
        """{"embedding": (C, h, w) float32, "mask": (1, S, S) float32, "valid": (2,) int64}."""
        with np.load(self.path(key)) as entry:
            return {
                "embedding": torch.from_numpy(entry["embedding"].astype(np.float32)),
                "mask": torch.from_numpy(entry["mask"].astype(np.float32))[None],
                "valid": torch.from_numpy(entry["valid"].astype(np.int64)),
            }

    def put(self, key: CacheKey, entry: dict[str, torch.Tensor]) -> Path:  # type: ignore[override]
        buffer = io.BytesIO()
        np.savez(
            buffer,
            embedding=entry["embedding"].detach().to(torch.float16).cpu().numpy(),
            mask=entry["mask"][0].cpu().numpy() > 0.5,
            valid=entry["valid"].cpu().numpy(),
        )
        return atomic_write(self.path(key), lambda file: file.write(buffer.getvalue()))


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
    (seed, epoch, i) among ``variants``. Items: {"embedding", "mask", "valid", "modality", "dataset"}."""

    def __init__(
        self,
        cache: EncoderCache,
        folders: Sequence[SegmentationFolder],
        sizes: Sequence[int],
        variants: int,
        seed: int = 0,
        modalities: Sequence[str] = MODALITIES,
    ) -> None:
        self.cache, self.folders, self.sizes = cache, list(folders), list(sizes)
        self.modalities = tuple(modalities)  # the model's: items carry ids into it
        self.variants, self.seed, self.epoch = variants, seed, 0
        self._items = [(f, i) for f, folder in enumerate(self.folders) for i in range(len(folder))]
        self.digests = [sample_digest(*_pair(self.folders[f][i])) for f, i in self._items]

    def __len__(self) -> int:
        return len(self._items)

    def variant_of(self, index: int) -> int:
        if self.variants == 1:
            return 0
        state = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0]
        return int(state % self.variants)

    def __getitem__(self, index: int) -> dict[str, Any]:
        which, _ = self._items[index]
        entry = self.cache.get(CacheKey(self.digests[index], self.sizes[which], self.variant_of(index)))
        modality = self.modalities.index(self.folders[which].modality)
        return {**entry, "modality": torch.tensor(modality), "dataset": torch.tensor(which)}

    def jobs(self, variants: Sequence[int]) -> list[tuple[int, CacheKey]]:
        """(item index, cache key) of every entry these variants need."""
        return [
            (i, CacheKey(self.digests[i], self.sizes[f], v))
            for i, (f, _) in enumerate(self._items)
            for v in variants
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
    variants: Sequence[int],
    *,
    seed: int,
    batch_size: int = 4,
    bf16: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Embed every missing (item, variant) of ``dataset`` with the controller-free encoder; returns the
    number computed. Same-size inputs are batched; the encoder runs in eval mode under ``no_grad``.

    Under torchrun every rank calls this and embeds every N-th batch (the batches of one process, so the
    same entries); all return once every entry is written. ``progress`` counts this rank's share.
    """
    todo = [(index, key) for index, key in dataset.jobs(variants) if key not in dataset.cache]

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
    with torch.no_grad(), autocast(device, bf16):
        embeddings = model.encode(torch.stack([x for x, _, _ in inputs]).to(device), None)
    for (_, key), (_, mask, valid), embedding in zip(chunk, inputs, embeddings, strict=True):
        dataset.cache.put(key, {"embedding": embedding.float(), "mask": mask, "valid": torch.tensor(valid)})
    return len(chunk)
