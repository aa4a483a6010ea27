"""Joint image/mask augmentation (albumentations) and the resize/normalise/pad to the model input.

``to_model_input`` follows ``ESPMedSAM.preprocess`` exactly (torch bilinear resize of the longer side to S,
antialiased when shrinking; the model's input normalisation of 0..255 RGB; zero padding at the bottom and
right after normalisation), so a model trained on its output sees what ``preprocess`` gives it at inference.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from espmedsam.config import IMAGENET_MEAN
from espmedsam.errors import InputError
from espmedsam.normalisation import normalise

MEAN_COLOUR = tuple(round(v) for v in IMAGENET_MEAN)


def train_augmentation(size: int, seed: int | None = None, zoom_probability: float = 0.0):
    """An albumentations ``Compose`` moving image and mask together, ending with the longer side at ``size``.

    Flips (horizontal, vertical), affine (scale 0.75-1.25, rotation +-20 degrees, translation +-10 %; image
    bilinear, mask nearest, zero border) and brightness/contrast (+-0.2, image only). The longer side is
    resized to ``size`` first, so the geometric transforms run on the small image. With probability
    ``zoom_probability`` the image is instead resized to a longer side of 1.25-2 x ``size`` (from the
    original, so thin structures survive) and a random ``size`` x ``size`` crop taken: the model then also
    learns the scale it sees when run at a larger input size. Call it as ``aug(image=image, mask=mask)`` with
    (H, W, 3) uint8 and (H, W) uint8 arrays.

    Args:
        seed: seeds the one generator all transforms share (see :func:`reseed`); None = unseeded.
    """
    import albumentations as A
    import cv2

    if size < 1:
        raise InputError(f"augmentation size must be positive, got {size}")
    if not 0 <= zoom_probability <= 1:
        raise InputError(f"zoom probability must be in [0, 1], got {zoom_probability}")
    resize = A.LongestMaxSize(max_size=size, interpolation=cv2.INTER_AREA)
    if zoom_probability > 0:
        zoomed = A.Sequential(
            [
                A.LongestMaxSize(
                    max_size=[round(size * z) for z in (1.25, 1.5, 1.75, 2.0)], area_for_downscale="image"
                ),
                # padding in the mean colour, which normalises to the 0 that inference pads with
                A.RandomCrop(size, size, pad_if_needed=True, pad_position="top_left", fill=MEAN_COLOUR),
            ],
            p=zoom_probability,
        )
        resize = A.OneOf([A.Sequential([resize], p=1 - zoom_probability), zoomed], p=1)
    compose = A.Compose(
        [
            resize,
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.Affine(scale=(0.75, 1.25), rotate=(-20, 20), translate_percent=(-0.1, 0.1), p=0.8),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.8),
        ]
    )
    if seed is not None:
        reseed(compose, seed)
    return compose


def appearance_augmentation(size: int, seed: int | None = None):
    """A wider augmentation for embedding variants, aimed at other sites' images: the longer side resized
    to ``size``, flips, affine (scale 0.7-1.3, rotation +-25 degrees, translation +-10 %, zero border),
    colour (brightness, contrast, saturation +-0.25-0.3, hue +-0.06: stains, cameras), gamma, and one of
    blur, a lower-resolution round trip or noise (scanners). Called as :func:`train_augmentation`.
    """
    import albumentations as A
    import cv2

    if size < 1:
        raise InputError(f"augmentation size must be positive, got {size}")
    compose = A.Compose(
        [
            A.LongestMaxSize(max_size=size, interpolation=cv2.INTER_AREA),
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.Affine(scale=(0.7, 1.3), rotate=(-25, 25), translate_percent=(-0.1, 0.1), p=0.8),
            A.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.3, hue=0.06, p=0.8),
            A.RandomGamma(gamma_limit=(70, 150), p=0.3),
            A.OneOf(
                [
                    A.GaussianBlur(blur_limit=(3, 5)),
                    A.Downscale(scale_range=(0.5, 0.8)),
                    A.GaussNoise(std_range=(0.02, 0.06)),
                ],
                p=0.3,
            ),
        ]
    )
    if seed is not None:
        reseed(compose, seed)
    return compose


def reseed(compose, seed: int) -> None:
    """Give every transform of ``compose`` one shared generator seeded with ``seed``.

    (``Compose.set_random_seed`` seeds each transform with the same value, which makes the two flips agree.)
    """
    compose.set_random_state(np.random.default_rng(seed), random.Random(seed))


def to_model_input(
    image: np.ndarray,
    mask: np.ndarray,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    normalisation: str = "mean_std",
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Resize the longer side to ``size``, normalise, and zero-pad to a square, like ``ESPMedSAM.preprocess``.

    Args:
        image: (H, W, 3) uint8 RGB.
        mask: (H, W) bool or integer (foreground > 0).
        size: S, the padded square side.
        mean, std: per-channel statistics on the 0..255 scale.
        normalisation: ``mean_std`` or ``minmax`` (see ``espmedsam.normalisation``).
    Returns:
        image (3, S, S) float32, mask (1, S, S) float32 in {0, 1} (nearest resize, zero padding), and the
        valid region (h, w) at the top left.
    Raises:
        InputError: an image that is not (H, W, 3) uint8, or a mask of another size.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if mask.shape != image.shape[:2]:
        raise InputError(f"mask shape {mask.shape} differs from the image's {image.shape[:2]}")
    h, w = mask.shape
    scale = size / max(h, w)
    resized = (max(1, round(h * scale)), max(1, round(w * scale)))
    x = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1).unsqueeze(0)
    if resized != (h, w):
        x = F.interpolate(x, size=resized, mode="bilinear", align_corners=False, antialias=scale < 1)
    x = normalise(x, normalisation, mean, std)
    m = torch.from_numpy(np.ascontiguousarray(mask > 0)).float()[None, None]
    if resized != (h, w):
        m = F.interpolate(m, size=resized, mode="nearest-exact")
    pad = (0, size - resized[1], 0, size - resized[0])
    return F.pad(x, pad)[0], F.pad(m, pad)[0], resized
