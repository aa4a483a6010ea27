"""The API's answers as pydantic models (what ``/docs`` shows), and how a ``Segmentation`` becomes one."""

from __future__ import annotations

import base64
import time

import numpy as np
import torch
from pydantic import BaseModel, Field

from espmedsam import __version__
from espmedsam.predict import Predictor
from espmedsam.serve.segmenter import Correction, QualityScore, Segmentation, png_base64
from espmedsam.serve.uploads import FORMATS, UploadLimits


class ErrorBody(BaseModel):
    detail: str = Field(description="one line that says what is wrong")


class Health(BaseModel):
    status: str
    version: str
    modalities: list[str]
    uptime_s: float


class ComponentParameters(BaseModel):
    component: str
    parameters: int


class Info(BaseModel):
    version: str
    checkpoint: str = Field(description="the checkpoint's file name")
    architecture: str = Field(description="espmedsam or unet")
    modalities: list[str]
    input_sizes: dict[str, int] = Field(description="the model input side of each modality")
    classifier: bool = Field(description="modality auto is available")
    patch_maps: bool = Field(description="the model has SPPG, so results carry patch maps")
    prompts: bool = Field(False, description="the model takes boxes and clicks (POST /api/prompt)")
    parameters: list[ComponentParameters]
    total_parameters: int
    percent_of_sam_vit_b: float
    device: str
    bfloat16: bool
    formats: list[str]
    limits: dict[str, int] = Field(description="max_bytes of an upload, max_pixels of a frame, max_frames")
    config: dict = Field(description="the model configuration stored in the checkpoint")


class MaskFile(BaseModel):
    filename: str
    media_type: str
    data: str = Field(description="base64 of the file")


class Slice(BaseModel):
    mask_png: str = Field(description="base64 PNG, 0 background / 255 foreground, the frame's own size")
    foreground_pixels: int
    image_png: str | None = Field(None, description="details only: the frame as the model saw it")
    patch_map_png: str | None = Field(None, description="details only: SPPG patch probability x 255")


class SegmentResult(BaseModel):
    filename: str = Field(description="the uploaded file's name, cleaned: for display only")
    format: str = Field(description=f"told by the content: one of {', '.join(FORMATS)}")
    modality: str
    chosen_by: str = Field(description="option (the request's modality) or classifier")
    probability: float | None = Field(description="the classifier's probability of the modality")
    probabilities: dict[str, float] | None = None
    known: bool | None = Field(
        None,
        description="classifier with feature statistics: false when the image looks like none of the "
        "model's modalities (the mask is then likely meaningless); null when not checked",
    )
    distance: float | None = Field(None, description="to the closest modality's feature statistics")
    unknown_threshold: float | None = Field(None, description="distances over it are unknown")
    width: int
    height: int
    frames: int
    foreground_pixels: int
    foreground_fraction: float
    foreground_mm2: float | None = Field(description="when the file gives the pixel spacing")
    spacing_mm: list[float] | None = None
    mask_png: str | None = Field(description="base64 PNG of the mask of a single-frame input")
    predicted_dice: float | None = Field(
        None,
        description="the quality score of a single-frame input's mask: its predicted Dice, calibrated on "
        "validation splits; null without a calibrated score",
    )
    review: bool | None = Field(None, description="predicted_dice is below review_below: check this mask")
    review_below: float | None = Field(None, description="the checkpoint's review threshold")
    quality_pending: bool = Field(
        False, description="the request left the quality score for later: POST /api/quality gives it"
    )
    image_id: str | None = Field(
        None, description="a single image kept on the server: correct its mask with POST /api/prompt"
    )
    mask_file: MaskFile = Field(
        description="what espmedsam predict writes: PNG, a multi-page TIFF for multi-page images, or NIfTI "
        "for volumes"
    )
    slices: list[Slice]
    seconds: dict[str, float] = Field(description="read, classify, segment, encode and total")


class PromptRequest(BaseModel):
    image_id: str = Field(description="from the image's /api/segment answer")
    boxes: list[list[float]] = Field([], description="[x0, y0, x1, y1] each, in the image's pixels")
    points: list[list[float]] = Field([], description="[x, y] each, in the image's pixels")
    labels: list[int] | None = Field(None, description="one per point: 1 foreground (default), 0 background")


class QualityRequest(BaseModel):
    image_id: str = Field(description="from the image's /api/segment answer")


class QualityResult(BaseModel):
    image_id: str
    predicted_dice: float | None = Field(
        description="the quality score of the image's prompt-free mask (as /api/segment gives it); null "
        "without a calibrated score"
    )
    review: bool | None = Field(description="predicted_dice is below review_below: check this mask")
    review_below: float | None
    seconds: float


class PromptResult(BaseModel):
    image_id: str
    mask_png: str = Field(description="base64 PNG of the corrected mask, 0 / 255, the image's own size")
    foreground_pixels: int
    foreground_fraction: float
    predicted_iou: list[float] = Field(
        description="the IoU head's estimate, one per decoder pass (with a click decoder, one per click)"
    )
    mask_file: MaskFile = Field(
        description="what espmedsam predict --box/--point writes for the same prompts"
    )
    seconds: float


def correction_of(correction: Correction) -> dict:
    """The JSON body of ``POST /api/prompt``."""
    mask = correction.mask
    filename, contents = correction.mask_file
    return {
        "image_id": correction.image_id,
        "mask_png": png_base64(mask.astype(np.uint8) * 255),
        "foreground_pixels": int(mask.sum()),
        "foreground_fraction": float(mask.mean()) if mask.size else 0.0,
        "predicted_iou": [round(v, 4) for v in correction.predicted_iou],
        "mask_file": {"filename": filename, "media_type": _media_type(filename), "data": _b64(contents)},
        "seconds": round(correction.seconds, 4),
    }


def result_of(segmentation: Segmentation, details: bool) -> dict:
    """The JSON body of ``POST /api/segment``."""
    encode_start = time.perf_counter()
    stack, masks = segmentation.stack, segmentation.masks
    slices = [_slice(stack.frames[i], result, details) for i, result in enumerate(segmentation.results)]
    pixels = int(masks.sum())
    spacing = stack.spacing
    filename, contents = segmentation.mask_file
    seconds = dict(segmentation.seconds)
    seconds["encode"] = time.perf_counter() - encode_start
    seconds["total"] += seconds["encode"]
    return {
        "filename": segmentation.name,
        "format": segmentation.format,
        "modality": segmentation.choice.modality,
        "chosen_by": segmentation.choice.chosen_by,
        "probability": segmentation.choice.probability,
        "probabilities": segmentation.choice.probabilities,
        "known": segmentation.choice.known,
        "distance": segmentation.choice.distance,
        "unknown_threshold": segmentation.unknown_threshold,
        "width": int(stack.frames.shape[2]),
        "height": int(stack.frames.shape[1]),
        "frames": len(masks),
        "foreground_pixels": pixels,
        "foreground_fraction": pixels / masks.size if masks.size else 0.0,
        "foreground_mm2": None if spacing is None else pixels * spacing[0] * spacing[1],
        "spacing_mm": None if spacing is None else [float(s) for s in spacing],
        "mask_png": slices[0]["mask_png"] if len(slices) == 1 else None,
        **_quality(
            segmentation.results[0].quality if len(segmentation.results) == 1 else None,
            segmentation.review_below,
        ),
        "quality_pending": segmentation.quality_pending,
        "image_id": segmentation.image_id,
        "mask_file": {"filename": filename, "media_type": _media_type(filename), "data": _b64(contents)},
        "slices": slices,
        "seconds": {key: round(value, 4) for key, value in seconds.items()},
    }


def quality_of(score: QualityScore) -> dict:
    """The JSON body of ``POST /api/quality``."""
    return {
        "image_id": score.image_id,
        **_quality(score.predicted_dice, score.review_below),
        "seconds": round(score.seconds, 4),
    }


def _quality(score: float | None, below: float) -> dict:
    if score is None:
        return {"predicted_dice": None, "review": None, "review_below": None}
    return {"predicted_dice": round(score, 4), "review": score < below, "review_below": below}


def _slice(frame: np.ndarray, result, details: bool) -> dict:
    out = {
        "mask_png": png_base64(result.mask.astype(np.uint8) * 255),
        "foreground_pixels": int(result.mask.sum()),
    }
    if details:
        out["image_png"] = png_base64(frame)
        if result.patch_map is not None:
            out["patch_map_png"] = png_base64((result.patch_map * 255).round().astype(np.uint8))
    return out


def info_of(predictor: Predictor, checkpoint_name: str, limits: UploadLimits) -> dict:
    """The body of ``GET /api/info``."""
    from espmedsam.config import to_dict
    from espmedsam.models.summary import SAM_VIT_B_PARAMETERS

    model = predictor.model
    config = model.config
    counts = _parameter_counts(model)
    total = counts[-1]["parameters"]
    return {
        "version": __version__,
        "checkpoint": checkpoint_name,
        "architecture": "unet" if config.name == "unet" else "espmedsam",
        "modalities": list(predictor.modalities),
        "input_sizes": {name: predictor.input_size(name) for name in predictor.modalities},
        "classifier": predictor.has_classifier,
        "patch_maps": hasattr(model, "sppg"),
        "prompts": getattr(model, "prompt_decoder", None) is not None,
        "parameters": counts,
        "total_parameters": total,
        "percent_of_sam_vit_b": round(100 * total / SAM_VIT_B_PARAMETERS, 2),
        "device": str(predictor.device),
        "bfloat16": predictor.bfloat16,
        "formats": list(FORMATS),
        "limits": {
            "max_bytes": limits.max_bytes,
            "max_pixels": limits.max_pixels,
            "max_frames": limits.max_frames,
        },
        "config": to_dict(config),
    }


def _parameter_counts(model: torch.nn.Module) -> list[dict]:
    from espmedsam.models.summary import parameter_counts

    if not hasattr(model, "sppg"):  # the U-Net baseline: one network
        return [{"component": "total", "parameters": sum(p.numel() for p in model.parameters())}]
    return [{"component": row.component, "parameters": row.parameters} for row in parameter_counts(model)]


def _media_type(filename: str) -> str:
    if filename.endswith(".png"):
        return "image/png"
    return "image/tiff" if filename.endswith(".tif") else "application/gzip"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
