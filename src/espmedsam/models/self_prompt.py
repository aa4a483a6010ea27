"""The model prompting itself: boxes around its own prompt-free mask, decoded by the promptable decoder.

LiteMedSAM's decoder was trained on about 1.5 M box-prompted medical images; given a box around the object,
it often draws a better boundary than a prompt-free decoder, and on some modalities a better object. So the
bounding box of each of the mask's largest components (``max_components``) is decoded, in one batch, and

- the quality score compares each component with its box's mask (``models/quality.py``);
- ``refined_logits`` replaces each of those components by its box's mask, inside the box (the rest of the
  mask, smaller components included, stays as it was): ``predict --refine self``, on the modalities
  where validation said it helps (``config.quality.refine_modalities``);
- ``refit_clicked`` does the same for the one component a foreground click has just corrected, on the
  modalities where validation said it helps (``config.prompt.refit_clicked``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

# (N, 4) boxes (x0, y0, x1, y1) in model-input pixels and the (N,) image each belongs to ->
# ((N, 1, S, S) prompted mask logits, (N,) predicted IoU)
BoxDecoder = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Component:
    """One connected component of a mask, in model-input pixels."""

    box: tuple[int, int, int, int]  # (x0, y0, x1, y1), corners inclusive
    pixels: np.ndarray  # (y1 - y0 + 1, x1 - x0 + 1) bool: the component's own pixels inside the box


@dataclass(frozen=True)
class SelfPrompts:
    """A batch's prompt-free masks, their largest components, and what the decoder made of their boxes."""

    components: list[list[Component]]  # per image, largest first
    counts: list[int]  # per image, all its components
    first: list[int]  # per image, the index of its first box in ``logits``
    logits: torch.Tensor | None  # (N, 1, S, S) float32 box-prompted logits, on the CPU; None: no box
    iou: torch.Tensor | None  # (N,) the IoU head's estimates

    def of_image(self, i: int) -> list[tuple[Component, torch.Tensor, float]]:
        """Image ``i``'s components, each with its (S, S) prompted logits and predicted IoU."""
        if self.logits is None or self.iou is None:
            return []
        k = self.first[i]
        return [(c, self.logits[k + j, 0], float(self.iou[k + j])) for j, c in enumerate(self.components[i])]


@torch.no_grad()
def self_prompts(
    mask_logits: torch.Tensor,
    valid_sizes: Sequence[tuple[int, int]],
    decode_boxes: BoxDecoder | None,
    max_components: int,
) -> SelfPrompts:
    """(B, 1, S, S) prompt-free mask logits and each image's unpadded (h, w) -> the boxes of each mask's
    ``max_components`` largest components, decoded in one pass (none without a decoder)."""
    components, counts, first, boxes, owners = [], [], [], [], []
    masks = (mask_logits.float() > 0).cpu().numpy()
    for i, (h, w) in enumerate(valid_sizes):
        found, count = largest_components(masks[i, 0, :h, :w], max_components)
        first.append(len(boxes))
        components.append(found)
        counts.append(count)
        boxes += [c.box for c in found]
        owners += [i] * len(found)
    if decode_boxes is None or not boxes:
        return SelfPrompts(components, counts, first, None, None)
    device = mask_logits.device
    box_tensor = torch.tensor(boxes, dtype=torch.float32, device=device)
    logits, iou = decode_boxes(box_tensor, torch.tensor(owners, device=device))
    return SelfPrompts(components, counts, first, logits.float().cpu(), iou.float().cpu())


def refined_logits(mask_logits: torch.Tensor, prompts: SelfPrompts, images: Sequence[int]) -> torch.Tensor:
    """(B, 1, S, S) prompt-free logits -> the same with each of ``images``' largest components replaced by
    its box's prompted mask inside the box (float32, on the CPU)."""
    out = mask_logits.float().cpu().clone()
    for i in images:
        for component, prompted, _ in prompts.of_image(i):
            _replace_component(out[i, 0], component, prompted)
    return out


@torch.no_grad()
def refit_clicked(
    mask_logits: torch.Tensor, valid_size: tuple[int, int], x: int, y: int, decode_boxes: BoxDecoder
) -> torch.Tensor:
    """(1, 1, S, S) logits of a mask just corrected by a foreground click at model-input pixel (x, y) ->
    the same with the connected component that holds the click replaced by its bounding box's prompted
    mask inside the box (float32, on the CPU); unchanged when the click is on no component.

    A click on a thin missed rim can grow a mask past its object; the box decoder, given the grown
    object's box, draws the object's boundary again (``config.prompt.refit_clicked``)."""
    out = mask_logits.float().cpu().clone()
    h, w = valid_size
    labels, _ = ndimage.label((out[0, 0, :h, :w] > 0).numpy())
    if not (0 <= y < h and 0 <= x < w) or not labels[y, x]:
        return out
    component = _component(labels, int(labels[y, x]), ndimage.find_objects(labels)[labels[y, x] - 1])
    boxes = torch.tensor([component.box], dtype=torch.float32, device=mask_logits.device)
    prompted, _ = decode_boxes(boxes, torch.zeros(1, dtype=torch.long, device=mask_logits.device))
    _replace_component(out[0, 0], component, prompted[0, 0].float().cpu())
    return out


def _replace_component(logits: torch.Tensor, component: Component, prompted: torch.Tensor) -> None:
    """In (S, S) ``logits``, in place: ``component`` leaves and the (S, S) ``prompted`` mask comes in,
    inside the component's box (other components in the box are kept)."""
    x0, y0, x1, y1 = component.box
    region = logits[y0 : y1 + 1, x0 : x1 + 1]
    own = torch.from_numpy(component.pixels)
    region[own] = torch.minimum(region[own], torch.tensor(-1.0))
    logits[y0 : y1 + 1, x0 : x1 + 1] = torch.maximum(region, prompted[y0 : y1 + 1, x0 : x1 + 1])


def largest_components(mask: np.ndarray, limit: int) -> tuple[list[Component], int]:
    """The ``limit`` largest connected components of an (h, w) bool mask, and how many it has."""
    labels, count = ndimage.label(mask)
    if not count:
        return [], 0
    sizes = ndimage.sum(mask, labels, range(1, count + 1))
    slices = ndimage.find_objects(labels)
    found = []
    for index in np.argsort(-sizes, kind="stable")[:limit]:
        found.append(_component(labels, index + 1, slices[index]))
    return found, count


def _component(labels: np.ndarray, label: int, found: tuple[slice, slice]) -> Component:
    """The component ``label`` of an ``ndimage.label`` map, from its ``find_objects`` slices."""
    rows, columns = found
    return Component(
        (columns.start, rows.start, columns.stop - 1, rows.stop - 1), labels[rows, columns] == label
    )
