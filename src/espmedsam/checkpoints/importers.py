"""Importers of foreign checkpoints: the official ESP-MedSAM release and MobileSAM.

Each importer owns one small key map from the foreign names to ours (official_forward.md §5-6), reads the
file with ``weights_only=True`` and loads strictly through ``load_strict``. SAM ViT-B lives in ``sam.py``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from espmedsam.errors import CheckpointError, InputError
from espmedsam.modalities import MODALITIES, modality_ids
from espmedsam.models.espmedsam import ESPMedSAM
from espmedsam.models.registry import build_model

from .torch_io import load_strict, read_torch_state_dict

logger = logging.getLogger(__name__)

# Official name prefix -> ours; None marks weights the official forward never uses (checked, then dropped).
OFFICIAL_PREFIXES: tuple[tuple[str, str | None], ...] = (
    ("SemiTViT.head.", None),
    ("SemiTViT.norm_head.", None),
    ("SemiTViT.", "image_encoder."),
    ("prompt_encoder.pe_layer.", "decoder.pe_layer."),
    ("prompt_encoder.", None),
    ("mask_decoder.transformer.", "decoder.transformer."),
    ("mask_decoder.output_upscaling.", "decoder.output_upscaling."),
    ("mask_decoder.output_hypernetworks_mlps.0.", "decoder.output_hypernetworks_mlps.0."),
    ("patch_decoder.", "sppg.patch_decoder."),
    ("dense_prompter.", "sppg.dense_prompter."),
    ("mask_query.", "decoder.mask_query."),
)
# Inside each official TinyViT block, the one "med" controller shared by all modalities -> our controller 0.
OFFICIAL_CONTROLLER: tuple[tuple[str, str], ...] = (
    (".attn.deep_QKV_embeddings_med", ".controllers.0.prompt_tokens"),
    (".attn.med_attention_biases", ".controllers.0.prompt_bias"),
    (".med_dah.", ".controllers.0.adapter."),
)
# MobileSAM / SAM decoder parts that exist in ours with the same structure (loaded where shapes match).
MOBILESAM_DECODER: tuple[tuple[str, str], ...] = (
    ("mask_decoder.transformer.", "decoder.transformer."),
    ("mask_decoder.output_upscaling.", "decoder.output_upscaling."),
    (
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        "decoder.pe_layer.positional_encoding_gaussian_matrix",
    ),
)
MOBILESAM_UNUSED = ("image_encoder.head.", "image_encoder.norm_head.")


def official_key(name: str) -> str | None:
    """Our name for an official key; None for a known-unused key; unchanged when no rule applies."""
    if name.startswith("SemiTViT.layers."):
        for old, new in OFFICIAL_CONTROLLER:
            name = name.replace(old, new)
    for old, new in OFFICIAL_PREFIXES:
        if name.startswith(old):
            return None if new is None else new + name[len(old) :]
    return name


def official_unused_shapes(last_dim: int = 320, embed_dim: int = 256) -> dict[str, tuple[int, ...]]:
    """Shapes of the official weights that never reach the output: the ImageNet head, SAM's prompt encoder."""
    shapes: dict[str, tuple[int, ...]] = {
        "SemiTViT.norm_head.weight": (last_dim,),
        "SemiTViT.norm_head.bias": (last_dim,),
        "SemiTViT.head.weight": (1000, last_dim),
        "SemiTViT.head.bias": (1000,),
        "prompt_encoder.not_a_point_embed.weight": (1, embed_dim),
        "prompt_encoder.no_mask_embed.weight": (1, embed_dim),
    }
    shapes.update({f"prompt_encoder.point_embeddings.{i}.weight": (1, embed_dim) for i in range(4)})
    # SAM's mask downscaling: conv 1->4, LN, GELU, conv 4->16, LN, GELU, conv 16->embed_dim
    downscaling = {"0.weight": (4, 1, 2, 2), "0.bias": (4,), "1.weight": (4,), "1.bias": (4,)}
    downscaling |= {"3.weight": (16, 4, 2, 2), "3.bias": (16,), "4.weight": (16,), "4.bias": (16,)}
    downscaling |= {"6.weight": (embed_dim, 16, 1, 1), "6.bias": (embed_dim,)}
    shapes.update({f"prompt_encoder.mask_downscaling.{k}": v for k, v in downscaling.items()})
    return shapes


def import_official(
    path: str | Path,
    *,
    modality: str | int | None = None,
    into: ESPMedSAM | None = None,
) -> ESPMedSAM:
    """Load an official ESP-MedSAM checkpoint (one controller and one hypernetwork shared by all modalities).

    Without ``modality``, returns the official layout (``build_model("official")``), which reproduces the
    official forward pass. With ``modality``, the official weights fill that modality's slot of a
    per-modality model: controller 0 -> controller k in every block, the shared hypernetwork -> k, query
    row k -> row k. With ``into=None`` a fresh ``build_model("default")`` also receives the shared weights
    (encoder, SPPG, decoder transformer, upscaling, position encoding); its output still differs from the
    official one (its own windows, normalisation and query decoupling). With ``into``, only slot k is
    written, and a warning is logged when the checkpoint's shared weights differ from the model's.

    Args:
        path: the official ``.pth`` file.
        modality: a name or id of the six official modalities (``MODALITIES``).
        into: a per-modality model to write slot k into; needs ``modality``.
    Returns:
        The loaded model (``into`` itself when given).
    Raises:
        CheckpointError: the file is unreadable or lacks, adds or mis-shapes keys (all listed at once).
        InputError: an unknown modality, ``into`` without ``modality``, or ``into`` of the official layout.
    """
    if into is not None and modality is None:
        raise InputError(
            "import_official(into=...) needs modality=: the slot to write the official weights to"
        )
    if modality is None:
        return _load_official(Path(path))
    name = MODALITIES[int(modality_ids(modality, MODALITIES)[0])]
    if into is not None:
        _check_target(into, name)
    official = _load_official(Path(path))
    target = into if into is not None else build_model("default")
    _write_modality(official, target, name, source=str(path), write_shared=into is None)
    return target


def _check_target(target: ESPMedSAM, name: str) -> None:
    """Raise InputError unless ``target`` has a slot of its own for modality ``name``."""
    if name not in target.modalities:
        raise InputError(f"modality {name!r} is not one of the model's: {', '.join(target.modalities)}")
    if target.config.controller.shared or target.config.decoder.shared_hypernetwork:
        raise InputError(
            "into= must be a per-modality model; for the official layout use import_official(path)"
        )


def _load_official(path: Path) -> ESPMedSAM:
    """The official layout loaded from ``path``; the unused weights must be present with their shapes."""
    state = read_torch_state_dict(path)
    if not any(name.startswith("SemiTViT.") for name in state):
        raise CheckpointError(
            f"{path} has no SemiTViT.* weights; it is not an official ESP-MedSAM checkpoint"
        )
    model = build_model("official")
    encoder = model.config.encoder
    problems = []
    for name, shape in official_unused_shapes(encoder.embed_dims[-1], encoder.out_chans).items():
        if name not in state:
            problems.append(f"missing unused key {name}")
        elif tuple(state[name].shape) != shape:
            problems.append(f"unused key {name} is {list(state[name].shape)}, expected {list(shape)}")
    mapped = {new: tensor for name, tensor in state.items() if (new := official_key(name)) is not None}
    try:
        load_strict(model, mapped, f"{path} (official keys shown by their espmedsam names)")
    except CheckpointError as error:
        raise CheckpointError("; ".join([str(error), *problems])) from None
    if problems:
        raise CheckpointError(f"{path} is not an official ESP-MedSAM checkpoint: " + "; ".join(problems))
    logger.info(
        "loaded %d official tensors from %s, dropped %d unused", len(mapped), path, len(state) - len(mapped)
    )
    return model


def _write_modality(
    official: ESPMedSAM, target: ESPMedSAM, name: str, *, source: str, write_shared: bool
) -> None:
    """Copy the official controller, hypernetwork and query of modality ``name`` into ``target``'s slot."""
    src, dst = MODALITIES.index(name), target.modalities.index(name)
    state = dict(target.state_dict())
    differing = 0
    for key, tensor in official.state_dict().items():
        slot_key = _slot_key(key, dst)
        if slot_key is not None:
            state[slot_key] = tensor
        elif key == "decoder.mask_query.weight":
            state[key] = _with_row(state[key], dst, tensor, src)
        elif write_shared:
            state[key] = tensor
        elif not _same(state.get(key), tensor):
            differing += 1
    load_strict(target, state, source)
    logger.info("wrote the official weights from %s to the %s slot (%d)", source, name, dst)
    if differing:
        logger.warning(
            "%d shared tensors of the model differ from %s: its %s output will differ from the official one",
            differing,
            source,
            name,
        )


def _same(ours: torch.Tensor | None, theirs: torch.Tensor) -> bool:
    if ours is None or ours.shape != theirs.shape:
        return False
    return torch.equal(ours.to(theirs.device, theirs.dtype), theirs)


def _slot_key(key: str, slot: int) -> str | None:
    """Our key of the official controller or hypernetwork moved to ``slot``; None for any other key."""
    for old in (".controllers.0.", "decoder.output_hypernetworks_mlps.0."):
        if old in key:
            return key.replace(old, old.replace(".0.", f".{slot}."))
    return None


def _with_row(rows: torch.Tensor, dst: int, source: torch.Tensor, src: int) -> torch.Tensor:
    """``rows`` with row ``dst`` replaced by ``source[src]``; ``source`` itself when widths differ."""
    if rows.shape[1:] != source.shape[1:]:
        return source  # load_strict reports the mis-shape
    rows = rows.clone()
    rows[dst] = source[src]
    return rows


def import_mobilesam(path: str | Path, *, into: ESPMedSAM | None = None) -> ESPMedSAM:
    """Load MobileSAM's TinyViT into the shared encoder, plus SAM's decoder parts where shapes match.

    Every non-controller key of ``image_encoder`` must come from the file; ``mask_decoder.transformer``,
    ``mask_decoder.output_upscaling`` and the position-encoding matrix are taken where their shapes match
    ours. Controllers, SPPG, queries and hypernetworks keep their initialisation.

    Args:
        path: ``mobile_sam.pt`` or another checkpoint with MobileSAM's ``image_encoder.*`` keys.
        into: the model to load into; None builds ``build_model("default")``.
    Returns:
        The loaded model (``into`` itself when given).
    Raises:
        CheckpointError: the file is unreadable, or its encoder lacks, adds or mis-shapes keys.
    """
    path = Path(path)
    state = read_torch_state_dict(path)
    if not any(name.startswith("image_encoder.") for name in state):
        raise CheckpointError(f"{path} has no image_encoder.* weights; it is not a MobileSAM checkpoint")
    target = into if into is not None else build_model("default")
    current = target.state_dict()
    # the shared encoder comes from the file alone, so a key it lacks is reported missing
    merged = {k: v for k, v in current.items() if not k.startswith("image_encoder.") or ".controllers." in k}
    merged.update(
        {
            k: v
            for k, v in state.items()
            if k.startswith("image_encoder.") and not k.startswith(MOBILESAM_UNUSED)
        }
    )
    loaded, skipped = [], []
    for name, tensor in state.items():
        ours = _mobilesam_decoder_key(name)
        if ours is None:
            continue
        if ours in current and current[ours].shape == tensor.shape:
            merged[ours] = tensor
            loaded.append(ours)
        else:
            skipped.append(name)
    load_strict(target, merged, str(path))
    logger.info(
        "loaded MobileSAM encoder and %d decoder tensors from %s; controllers, SPPG, queries and "
        "hypernetworks keep their initialisation",
        len(loaded),
        path,
    )
    if skipped:
        logger.info("skipped %d decoder tensors whose shapes differ: %s", len(skipped), ", ".join(skipped))
    return target


def _mobilesam_decoder_key(name: str) -> str | None:
    for old, new in MOBILESAM_DECODER:
        if name.startswith(old):
            return new + name[len(old) :]
    return None
