"""Images to distil on: files with a content digest, their modality, and the cached input variants.

A variant is one of the 8 flips/rotations of the square model input (variant 0 is the image as is, 1 its
mirror image); with ``variants = V`` each image is seen as variants 0..V-1, and the teacher embeds each
variant once.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from espmedsam.data.dataset import find_files, read_split
from espmedsam.data.io import IMAGE_SUFFIXES, read_image
from espmedsam.errors import DataError, InputError

MAX_VARIANTS = 8
Preprocess = Callable[..., tuple[torch.Tensor, object]]


@dataclass(frozen=True)
class DistillImage:
    """One image file; ``digest`` (SHA-256 of its bytes) keys the cache, so renames and copies still hit."""

    path: Path
    digest: str
    modality: str | None  # None in the common stage (no controller)


def list_images(folder: str | Path, modality: str | None = None, split: str = "train") -> list[DistillImage]:
    """The images of a folder: a dataset folder's ``images/`` (only ``split``'s stems when it has a
    ``split.json``), or else the image files directly in ``folder``, sorted.

    Raises:
        DataError: a missing folder, or one without images.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    dataset = (root / "images").is_dir()
    files = find_files(root / "images" if dataset else root, IMAGE_SUFFIXES)
    if dataset and (root / "split.json").is_file():
        stems = set(read_split(root).get(split, []))
        files = {stem: paths for stem, paths in files.items() if stem in stems}
    paths = [paths[0] for _, paths in sorted(files.items())]
    if not paths:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return [DistillImage(path, file_digest(path), modality) for path in paths]


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def unique(images: Sequence[DistillImage]) -> list[DistillImage]:
    """``images`` without repeated (content, modality) pairs, first occurrence kept: a folder passed twice or
    a copied file is embedded once and cannot sit on both sides of the held-out split."""
    seen: set[tuple[str, str | None]] = set()
    kept = []
    for image in images:
        if (image.digest, image.modality) not in seen:
            seen.add((image.digest, image.modality))
            kept.append(image)
    return kept


def hold_out(images: Sequence[DistillImage], fraction: float, seed: int) -> tuple[list, list]:
    """(train, held_out): a seeded random ``fraction`` of the images is held out (at least one if > 0)."""
    if not 0 <= fraction < 1:
        raise InputError(f"held-out fraction must be in [0, 1), got {fraction}")
    order = list(images)
    random.Random(seed).shuffle(order)
    count = max(1, round(fraction * len(order))) if fraction > 0 and len(order) > 1 else 0
    return order[count:], order[:count]


class InputStore:
    """(3, S, S) normalised, padded model inputs, kept in memory up to ``max_bytes``.

    Decoding and resizing an image costs about a tenth of a student step at 256², and every epoch needs
    every image again; kept or not, an input is bit-identical.
    """

    def __init__(self, preprocess: Preprocess, size: int, max_bytes: int = 0) -> None:
        self.preprocess, self.size, self.max_bytes = preprocess, size, max_bytes
        self._kept: dict[str, torch.Tensor] = {}
        self._bytes = 0

    def get(self, image: DistillImage, variant: int = 0) -> torch.Tensor:
        """The input of ``image``, flipped/rotated to ``variant``."""
        x = self._kept.get(image.digest)
        if x is None:
            x = self.preprocess(read_image(image.path), self.size)[0][0]
            if self._bytes + x.nbytes <= self.max_bytes:
                self._kept[image.digest] = x
                self._bytes += x.nbytes
        return dihedral(x, variant)

    def batch(self, images: Sequence[DistillImage], variants: Sequence[int]) -> torch.Tensor:
        """(B, 3, S, S) inputs of ``images`` in ``variants``."""
        return torch.stack([self.get(image, v) for image, v in zip(images, variants, strict=True)])


def dihedral(x: torch.Tensor, variant: int) -> torch.Tensor:
    """Variant 0..7 of a (..., S, S) tensor: as is, horizontal flip, vertical flip, both (= 180° rotation),
    then the same four after a 90° rotation; so ``variants: 2`` means the image and its mirror image."""
    if not 0 <= variant < MAX_VARIANTS:
        raise InputError(f"variant must be in 0..{MAX_VARIANTS - 1}, got {variant}")
    if variant >= 4:
        x = torch.rot90(x, 1, dims=(-2, -1))
    flips = [dim for bit, dim in ((1, -1), (2, -2)) if variant & bit]
    return torch.flip(x, dims=flips) if flips else x
