"""Parameter counts by paper component, for ``espmedsam info`` and the size benchmark."""

from __future__ import annotations

from dataclasses import dataclass

from espmedsam.models.espmedsam import ESPMedSAM

SAM_VIT_B_PARAMETERS = 93_735_472  # SAM ViT-B, whole model (image encoder, prompt encoder, mask decoder)


@dataclass(frozen=True)
class ComponentCount:
    component: str
    parameters: int


def parameter_counts(model: ESPMedSAM) -> list[ComponentCount]:
    """Shared TinyViT, each controller, refiner, SPPG, QDMD, its detail branch, classifier and promptable
    decoder (each if any) and the total, in that order; the rows before the total add up to it."""
    controller_names = model.modalities if not model.config.controller.shared else ("all modalities",)
    controller_names = controller_names if model.config.controller.enabled else ()
    shared = 0
    per_controller = [0] * len(controller_names)
    for name, p in model.image_encoder.named_parameters():
        if ".controllers." in name:
            per_controller[int(name.split(".controllers.")[1].split(".")[0])] += p.numel()
        else:
            shared += p.numel()
    rows = [ComponentCount("shared TinyViT encoder", shared)]
    pairs = zip(controller_names, per_controller, strict=True)
    rows += [ComponentCount(f"controller: {n}", c) for n, c in pairs]
    if _count(model.refiner):
        rows.append(ComponentCount("embedding refiner", _count(model.refiner)))
    rows.append(ComponentCount("SPPG (self-patch prompt generator)", _count(model.sppg)))
    detail = model.decoder.detail_branch
    detail_count = _count(detail) if detail is not None else 0
    qdmd = "QDMD (query-decoupled modality decoder)"
    rows.append(ComponentCount(qdmd, _count(model.decoder) - detail_count))
    if detail is not None:  # inside QDMD's module, counted on its own row
        rows.append(ComponentCount("detail branch (image-resolution features into QDMD)", detail_count))
    if model.classifier is not None:
        rows.append(ComponentCount("modality classifier", _count(model.classifier)))
    if model.prompt_decoder is not None:
        prompts = _count(model.prompt_decoder)
        rows.append(ComponentCount("promptable decoder (boxes, clicks, IoU head)", prompts))
    if model.click_decoder is not None:
        rows.append(ComponentCount("click decoder (clicks on the mask so far)", _count(model.click_decoder)))
    rows.append(ComponentCount("total", _count(model)))
    return rows


def sam_ratio(model: ESPMedSAM) -> float:
    """Parameters of ``model`` as a fraction of SAM ViT-B's."""
    return _count(model) / SAM_VIT_B_PARAMETERS


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())
