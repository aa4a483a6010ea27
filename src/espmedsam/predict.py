"""Inference: ``Predictor`` for arrays, ``predict_paths`` for files, folders and globs."""

from __future__ import annotations

import glob
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from espmedsam.data.io import IMAGE_SUFFIXES, read_image, write_png
from espmedsam.device import resolve_device
from espmedsam.errors import InputError
from espmedsam.models.espmedsam import ESPMedSAM, ModalityLike
from espmedsam.visualize import overlay

if TYPE_CHECKING:
    from espmedsam.models.unet import UNetBaseline

logger = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).parent / "assets" / "examples"


class Predictor:
    """Runs a model on raw images of any size; inference mode and autocast live here, not in the model."""

    def __init__(
        self,
        model: ESPMedSAM | UNetBaseline,
        *,
        device: str = "auto",
        size: int | None = None,
        bfloat16: bool = True,
    ) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.size = size  # None: each modality's size from the model's config
        self.bfloat16 = bfloat16

    def input_size(self, modality: ModalityLike) -> int:
        """The model input side for one image of ``modality``: ``size``, else the model's choice."""
        return self.size or self.model.input_size(modality)

    @torch.inference_mode()
    def predict_logits(self, image: np.ndarray, modality: ModalityLike) -> np.ndarray:
        """(H, W[, C]) uint8 image -> (H, W) float32 mask logits at the image's own size."""
        x, meta = self.model.preprocess(image, self.input_size(modality))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bfloat16):
            out = self.model(x.to(self.device), modality)
        return self.model.postprocess(out.masks, meta)[0, 0].cpu().numpy()

    def predict(self, image: np.ndarray, modality: ModalityLike) -> np.ndarray:
        """(H, W[, C]) uint8 image -> (H, W) bool mask (logit > 0, i.e. probability > 0.5)."""
        return self.predict_logits(image, modality) > 0


@dataclass(frozen=True)
class PredictionResult:
    source: Path
    modality: str
    mask_path: Path
    overlay_path: Path
    foreground_fraction: float


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files, folders (their images, sorted) and glob patterns -> image paths.

    Raises:
        InputError: an input that matches nothing, or no image at all.
    """
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.exists():
            paths.append(path)
        else:
            matches = sorted(Path(p) for p in glob.glob(str(item), recursive=True))
            if not matches:
                raise InputError(f"{item}: no such file, folder or glob match")
            paths += [p for p in matches if p.is_file()]
    if not paths:
        raise InputError("no input images found")
    return paths


def modality_from_name(path: Path, names: Sequence[str]) -> str | None:
    """The modality a file name starts with (``xray_case1.png`` -> ``xray``), if any."""
    prefix = path.stem.split("_")[0].lower()
    return prefix if prefix in names else None


def predict_paths(
    predictor: Predictor, paths: Sequence[Path], out_dir: str | Path, *, modality: str | None = None
) -> Iterator[PredictionResult]:
    """Predict each image and write ``<stem>_mask.png`` (0/255, original size) and ``<stem>_overlay.png``.

    Yields one result per image, so callers can show progress.

    Raises:
        InputError: no ``modality`` given and a file name that does not start with one.
    """
    out_dir = Path(out_dir)
    names = predictor.model.modalities
    for path in paths:
        image_modality = modality or modality_from_name(path, names)
        if image_modality is None:
            raise InputError(f"{path}: cannot tell its modality; pass --modality ({', '.join(names)})")
        image = read_image(path)
        mask = predictor.predict(image, image_modality)
        mask_path = write_png(out_dir / f"{path.stem}_mask.png", mask.astype(np.uint8) * 255)
        overlay_path = write_png(out_dir / f"{path.stem}_overlay.png", overlay(image, mask))
        yield PredictionResult(path, image_modality, mask_path, overlay_path, float(mask.mean()))
