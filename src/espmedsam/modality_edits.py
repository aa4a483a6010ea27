"""Adding, removing and renaming a trained model's modalities, and training one modality alone.

Semi-parameter sharing puts each modality in parameters of its own: its controller in every attention
block, its query and hypernetwork in QDMD, its row of the classifier's last layer and its feature
statistics. ``remap_modalities`` builds a model with another list of modalities, each slot filled from an
old modality's parameters (or freshly initialised: a new controller is the identity; fresh statistics are
empty), and every shared parameter copied as it is. Since an image only meets its own modality's
parameters, every kept modality gives bitwise the same outputs.

``train_only_modalities`` makes a model trainable in the given modalities' parameters alone; a gradient
mask keeps the other rows of the tensors that hold one row per modality (queries, classifier) untouched.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import torch
from torch import nn

from espmedsam.config import ModelConfig
from espmedsam.errors import ConfigError, InputError
from espmedsam.modalities import check_modality_name
from espmedsam.models.espmedsam import ESPMedSAM
from espmedsam.models.registry import build_model

# state-dict keys of one modality's module: (prefix pattern, the index group)
_OWN_MODULES = (
    re.compile(r"^(image_encoder\..*\.controllers\.)(\d+)(\..*)$"),
    re.compile(r"^(decoder\.output_hypernetworks_mlps\.)(\d+)(\..*)$"),
)
# tensors holding one row per modality (their leading axis); the classifier's rows are trained apart
_QUERY_ROWS = "decoder.mask_query.weight"
_ROW_TENSORS = (
    _QUERY_ROWS,
    "classifier.fc2.weight",
    "classifier.fc2.bias",
    # the classifier's per-modality feature statistics; a fresh modality has none (count 0) until fitted
    *(f"classifier.statistics_{name}" for name in ("mean", "basis", "log_variance", "log_residual")),
    "classifier.statistics_scale",
    "classifier.statistics_count",
    "quality.modality_bias",  # the quality score's; a fresh modality takes the others' mean
)


def remap_modalities(
    model: ESPMedSAM,
    names: Sequence[str],
    sources: Sequence[int | None],
    *,
    input_sizes: Sequence[int] | None = None,
    seed: int = 0,
) -> ESPMedSAM:
    """A model whose modality ``j`` is ``names[j]``, with the parameters of old modality ``sources[j]``
    (None: fresh, initialised from ``seed``; a fresh controller is the identity).

    Args:
        input_sizes: per new modality; default: each source's, and the model's image size for fresh ones.
    Raises:
        ConfigError: a layout whose modalities share parameters (one shared controller or hypernetwork,
            or queries that attend to each other) and so cannot be edited one by one.
    """
    _check_editable(model)
    config = model.config
    if input_sizes is None and config.inference_sizes:
        input_sizes = [config.image_size if s is None else config.inference_sizes[s] for s in sources]
    sizes = tuple(input_sizes or ())
    # ``--refine self`` and the clicked object's refit stay on for the kept modalities they were chosen
    # for (a fresh one has no validation)
    kept = {name: name for name in names}
    new_config = dataclasses.replace(
        _chosen_renamed(config, kept), modalities=tuple(names), inference_sizes=sizes
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = build_model(new_config)
    old_state = model.state_dict()
    state = {key: _remapped(key, tensor, old_state, sources) for key, tensor in fresh.state_dict().items()}
    fresh.load_state_dict(state, strict=True)
    return fresh.train(model.training)


def append_modality(
    model: ESPMedSAM, name: str, *, like: str | None = None, input_size: int | None = None, seed: int = 0
) -> ESPMedSAM:
    """``model`` with modality ``name`` added last: its parameters copied from modality ``like``, or
    fresh (identity controller, new query and hypernetwork).

    Raises:
        InputError: a name that exists already or is not a valid name, or an unknown ``like``.
    """
    names = list(model.modalities)
    check_modality_name(name)
    if name in names:
        raise InputError(f"the model has a modality {name!r} already ({', '.join(names)})")
    source = None if like is None else _index(model, like)
    sizes = None  # remap_modalities' default: each source's size, the model's for a fresh one
    if input_size:
        sizes = [*(model.config.inference_sizes or [model.config.image_size] * len(names)), input_size]
    return remap_modalities(model, [*names, name], [*range(len(names)), source], input_sizes=sizes, seed=seed)


def remove_modality(model: ESPMedSAM, name: str) -> ESPMedSAM:
    """``model`` without modality ``name``; the others keep their parameters and outputs.

    Raises:
        InputError: an unknown name, or the model's last modality.
    """
    drop = _index(model, name)
    if len(model.modalities) == 1:
        raise InputError(f"{name!r} is the model's only modality; a model needs one")
    keep = [i for i in range(len(model.modalities)) if i != drop]
    return remap_modalities(model, [model.modalities[i] for i in keep], keep)


def rename_modality(model: ESPMedSAM, old: str, new: str) -> ESPMedSAM:
    """``model`` with modality ``old`` called ``new`` (only the configuration changes).

    Raises:
        InputError: an unknown ``old``, or a ``new`` that exists already or is not a valid name.
    """
    index = _index(model, old)
    check_modality_name(new)
    if new in model.modalities:
        raise InputError(f"the model has a modality {new!r} already ({', '.join(model.modalities)})")
    names = list(model.modalities)
    names[index] = new
    mapping = {name: new if name == old else name for name in model.modalities}
    model.config = dataclasses.replace(_chosen_renamed(model.config, mapping), modalities=tuple(names))
    return model


def _chosen_renamed(config: ModelConfig, mapping: dict[str, str]) -> ModelConfig:
    """``config`` with the modalities chosen on validation (``--refine self``, the clicked object's refit)
    renamed by ``mapping``; those it does not name are dropped."""

    def renamed(chosen: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(mapping[m] for m in chosen if m in mapping)

    quality = dataclasses.replace(config.quality, refine_modalities=renamed(config.quality.refine_modalities))
    prompt = dataclasses.replace(config.prompt, refit_clicked=renamed(config.prompt.refit_clicked))
    return dataclasses.replace(config, quality=quality, prompt=prompt)


def modality_parameter_names(model: ESPMedSAM, names: Sequence[str]) -> dict[str, list[int] | None]:
    """The segmentation parameters owned by the modalities ``names`` (controllers, queries,
    hypernetworks): state-dict name -> None (the whole tensor) or the rows of the query table that are
    theirs."""
    ids = [_index(model, name) for name in names]
    owned: dict[str, list[int] | None] = {}
    for key, _ in model.named_parameters():
        if key == _QUERY_ROWS:
            owned[key] = ids
        elif any((found := p.match(key)) and int(found.group(2)) in ids for p in _OWN_MODULES):
            owned[key] = None
    return owned


def train_only_modalities(model: ESPMedSAM, names: Sequence[str]) -> dict[str, list[int] | None]:
    """Let only the segmentation parameters of ``names`` learn (``modality_parameter_names``).

    Every other parameter stops requiring gradients, and a hook zeroes the other modalities' rows of the
    query table's gradient: AdamW's step for a zero gradient without weight decay (queries have none) is
    exactly zero, so those rows stay bitwise as they are. Returns what ``modality_parameter_names`` does.
    """
    _check_editable(model)
    owned = modality_parameter_names(model, names)
    for key, parameter in model.named_parameters():
        parameter.requires_grad_(key in owned)
        rows = owned.get(key)
        if rows is not None:
            parameter.register_hook(_row_mask_hook(parameter.shape[0], rows))
    return owned


def trainable_count(model: nn.Module, owned: dict[str, list[int] | None]) -> int:
    """How many numbers learn under ``train_only_modalities``: whole tensors, and only their own rows."""
    parameters = dict(model.named_parameters())
    return sum(
        parameters[key].numel() if rows is None else parameters[key][0].numel() * len(rows)
        for key, rows in owned.items()
    )


def _row_mask_hook(count: int, rows: list[int]):
    keep = torch.zeros(count, dtype=torch.bool)
    keep[rows] = True

    def hook(gradient: torch.Tensor) -> torch.Tensor:
        shape = (count,) + (1,) * (gradient.ndim - 1)
        return gradient * keep.to(gradient.device).view(shape).to(gradient.dtype)

    return hook


def _remapped(key: str, fresh: torch.Tensor, old: dict[str, torch.Tensor], sources) -> torch.Tensor:
    """The value of new state-dict entry ``key``: a shared tensor as it was, a modality's own from its
    source modality (or fresh), a per-modality tensor's rows gathered in the new order."""
    for pattern in _OWN_MODULES:
        found = pattern.match(key)
        if found:
            source = sources[int(found.group(2))]
            return fresh if source is None else old[f"{found.group(1)}{source}{found.group(3)}"]
    if key in _ROW_TENSORS:
        if key.startswith("quality."):
            fresh = torch.full_like(fresh, float(old[key].mean()))
        return torch.stack([fresh[j] if s is None else old[key][s] for j, s in enumerate(sources)])
    return old[key]


def _check_editable(model: ESPMedSAM) -> None:
    if not isinstance(model, ESPMedSAM):
        raise ConfigError("only ESP-MedSAM checkpoints have modalities to edit (not the U-Net baseline)")
    config = model.config
    shared = [
        what
        for what, is_shared in (
            ("one controller for all", config.controller.enabled and config.controller.shared),
            ("one hypernetwork for all", config.decoder.shared_hypernetwork),
            ("queries that attend to each other", config.decoder.decode_all_queries),
            ("extra queries", config.decoder.extra_queries > 0),
        )
        if is_shared
    ]
    if shared:
        raise ConfigError(
            f"this layout's modalities share parameters ({'; '.join(shared)}), so one cannot be added or "
            "removed without changing the others (the official layout: import it into a six-modality model)"
        )


def _index(model: ESPMedSAM, name: str) -> int:
    if name not in model.modalities:
        raise InputError(f"unknown modality {name!r}; the model has {', '.join(model.modalities)}")
    return model.modalities.index(name)
