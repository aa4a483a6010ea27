"""Native checkpoints (ESP-MedSAM and the U-Net baseline): one safetensors file holding the weights and, in
its metadata, the model config.

The metadata is ``{"format": "espmedsam", "format_version": "1", "config": ModelConfig.to_json()}``, so a
checkpoint rebuilds its own model; loading is strict and never unpickles anything.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from espmedsam.checkpoints.lineage import LINEAGE_KEY, read_lineage
from espmedsam.config import ModelConfig, from_dict
from espmedsam.errors import CheckpointError, ConfigError, InputError
from espmedsam.files import atomic_write
from espmedsam.models.espmedsam import ESPMedSAM
from espmedsam.models.registry import build_model
from espmedsam.models.unet import UNET_FORMAT, UNetBaseline, UNetConfig

from .torch_io import load_strict

T = TypeVar("T")

FORMAT = "espmedsam"
FORMAT_VERSION = "1"
DEFAULT_WEIGHTS = "espmedsam_default.safetensors"  # shipped in the package's weights/ folder, if at all
# torch.save writes a zip archive (or, in the legacy format, a pickle stream starting with PROTO)
_TORCH_MAGICS = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def save_model(model: ESPMedSAM, path: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write ``model``'s weights and config to one safetensors file, atomically.

    Args:
        model: the model to save; its ``config`` goes into the file's metadata.
        path: the file to write (its folder is created); an existing file is replaced.
        dtype: store floating tensors in this dtype (e.g. ``torch.float16`` to ship); None keeps them.
    Returns:
        The written path.
    Raises:
        InputError: ``dtype`` is not a floating dtype.
    """
    path = Path(path)
    tensors = state_tensors(model, dtype)
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": model.config.to_json()}
    lineage = getattr(model, "lineage", None)
    if lineage:  # the training runs behind these weights (``checkpoints.lineage``)
        metadata[LINEAGE_KEY] = json.dumps(lineage)
    return write_safetensors(path, tensors, metadata)


def state_tensors(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``model``'s state dict as contiguous CPU copies, floating tensors cast to ``dtype`` if given.

    Raises:
        InputError: ``dtype`` is not a floating dtype.
    """
    if dtype is not None and not dtype.is_floating_point:
        raise InputError(f"checkpoint dtype must be a floating dtype, got {dtype}")
    return {name: _stored(tensor, dtype) for name, tensor in model.state_dict().items()}


def export_checkpoint(
    source: str | Path,
    out: str | Path,
    *,
    dtype: torch.dtype | None = None,
    inference_sizes: dict[str, int] | None = None,
    drop_controllers: bool = False,
) -> Path:
    """Rewrite an ESP-MedSAM or U-Net checkpoint, e.g. in float16 to ship, with per-modality input sizes.

    Args:
        inference_sizes: modality -> input side; modalities not named keep their current one (their
            ``inference_sizes`` entry, else ``image_size``).
        drop_controllers: remove the modality controllers, leaving the shared encoder alone: for a model
            whose decoder was trained on the controller-free encoder (``frozen_encoder``), whose
            controllers are the identity; it is then smaller, faster and exactly what was trained.
    Raises:
        CheckpointError: as ``load_checkpoint``. ConfigError: an unknown modality or a bad size, or
            ``drop_controllers`` for a U-Net.
    """
    model = load_checkpoint(source)
    if drop_controllers:
        model = _without_controllers(model)
    if inference_sizes:
        config = model.config
        unknown = sorted(set(inference_sizes) - set(config.modalities))
        if unknown:
            raise ConfigError(
                f"unknown modality {', '.join(unknown)}; expected {', '.join(config.modalities)}"
            )
        sizes = tuple(inference_sizes.get(m, model.input_size(m)) for m in config.modalities)
        model.config = dataclasses.replace(config, inference_sizes=sizes)
    if isinstance(model, ESPMedSAM):
        return save_model(model, out, dtype=dtype)
    return save_unet(model, out, dtype=dtype)


def _without_controllers(model: ESPMedSAM | UNetBaseline) -> ESPMedSAM:
    if not isinstance(model, ESPMedSAM):
        raise ConfigError("--drop-controllers needs an ESP-MedSAM checkpoint")
    config = dataclasses.replace(
        model.config, controller=dataclasses.replace(model.config.controller, enabled=False)
    )
    bare = build_model(config)
    kept = {k: v for k, v in model.state_dict().items() if ".controllers." not in k}
    load_strict(bare, kept, "the controller-free model")
    bare.lineage = model.lineage
    return bare


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write one safetensors file atomically: a unique temporary name in the same folder, then rename."""
    return atomic_write(path, lambda file: file.write(safetensors_bytes(tensors, metadata=metadata)))


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> ESPMedSAM:
    """Rebuild the model stored by ``save_model`` from its config, load its weights strictly, in eval mode.

    Floating tensors stored in another dtype (e.g. float16) are cast back to float32.

    Raises:
        CheckpointError: the file is missing, not a safetensors file or truncated, not an espmedsam
            checkpoint, holds an invalid config, or its keys or shapes do not fit the model.
    """
    path = Path(path)
    config, tensors = read_safetensors(path, FORMAT, ModelConfig)
    try:
        model = build_model(config)
    except (ConfigError, ValueError, IndexError) as error:
        raise CheckpointError(f"{path} has a model config that does not build a model: {error}") from None
    load_strict(model, tensors, str(path))
    model.lineage = read_lineage(path)
    return model.to(device).eval()


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu") -> ESPMedSAM | UNetBaseline:
    """An ESP-MedSAM checkpoint (``load_model``) or a U-Net baseline one (``load_unet``), by its format.

    Raises:
        CheckpointError: as ``load_model`` / ``load_unet``.
    """
    if _stored_format(Path(path)) == UNET_FORMAT:
        return load_unet(path).to(device)
    return load_model(path, device=device)


def read_safetensors(path: Path, fmt: str, config_cls: type[T]) -> tuple[T, dict[str, torch.Tensor]]:
    """The config (of ``config_cls``, from the metadata) and float32 tensors of a file of format ``fmt``.

    Raises:
        CheckpointError: a missing or unreadable file, another format, or an invalid config.
    """
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is an empty file (0 bytes)")
    try:
        with safe_open(str(path), framework="pt") as file:
            config = _config(path, file.metadata() or {}, fmt, config_cls)
            tensors = {name: _loaded(file.get_tensor(name)) for name in file.keys()}
    except SafetensorError as error:
        raise CheckpointError(_unreadable(path, error)) from None
    except OSError as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error.strerror or error}") from None
    return config, tensors


def default_checkpoint() -> Path | None:
    """The bundled default checkpoint ``espmedsam/weights/espmedsam_default.safetensors``, or None."""
    path = Path(__file__).resolve().parents[1] / "weights" / DEFAULT_WEIGHTS
    return path if path.is_file() else None


def _stored_format(path: Path) -> str | None:
    """The ``format`` in a safetensors file's metadata; None when unreadable (the loader says why)."""
    try:
        with safe_open(str(path), framework="pt") as file:
            return (file.metadata() or {}).get("format")
    except (SafetensorError, OSError):
        return None


def _stored(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    tensor = tensor.detach()
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.to("cpu", copy=True).contiguous()


def _loaded(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.is_floating_point() else tensor


def _config(path: Path, metadata: dict[str, str], fmt: str, config_cls: type[T]) -> T:
    """The config in ``metadata``, or a CheckpointError saying why there is none."""
    if metadata.get("format") != fmt:
        found = metadata.get("format")
        kind = "an espmedsam checkpoint" if fmt == FORMAT else f"a {fmt!r} file"
        raise CheckpointError(
            f"{path} is a safetensors file but not {kind} (format {found!r})"
            if found
            else f"{path} is a safetensors file but not {kind} (no espmedsam metadata)"
        )
    if metadata.get("format_version") != FORMAT_VERSION:
        version = metadata.get("format_version")
        raise CheckpointError(
            f"{path} has espmedsam format version {version!r}; this version reads {FORMAT_VERSION!r}"
        )
    return config_from_metadata(path, metadata, config_cls)


def config_from_metadata(path: Path, metadata: dict[str, str], config_cls: type[T]) -> T:
    """The ``config`` JSON of a file's metadata (a checkpoint's or an ONNX export's) as ``config_cls``.

    Raises:
        CheckpointError: no config, unreadable JSON, or an invalid config.
    """
    try:
        return from_dict(config_cls, json.loads(metadata["config"]))
    except KeyError:
        raise CheckpointError(f"{path} has no model config in its metadata") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} has an unreadable model config: {error}") from None
    except ConfigError as error:
        raise CheckpointError(f"{path} has an invalid model config: {error}") from None


def _unreadable(path: Path, error: Exception) -> str:
    with path.open("rb") as file:
        head = file.read(4)
    if head.startswith(_TORCH_MAGICS):
        return (
            f"{path} is a torch file, not an espmedsam checkpoint; "
            "use `espmedsam import ...` for official/MobileSAM/SAM files"
        )
    return f"{path} is not a safetensors file or is truncated ({error})"


def save_unet(model: UNetBaseline, path: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write the baseline's weights (floating tensors in ``dtype`` if given) and config, atomically."""
    metadata = {"format": UNET_FORMAT, "format_version": FORMAT_VERSION, "config": model.config.to_json()}
    return write_safetensors(path, state_tensors(model, dtype), metadata)


def load_unet(path: str | Path) -> UNetBaseline:
    """The baseline stored by :func:`save_unet`, loaded strictly, in eval mode.

    Raises:
        CheckpointError: a missing or unreadable file, another format, or keys that do not fit.
    """
    path = Path(path)
    config, tensors = read_safetensors(path, UNET_FORMAT, UNetConfig)
    try:
        model = UNetBaseline(config)
    except InputError as error:
        raise CheckpointError(f"{path}: {error}") from None
    load_strict(model, tensors, str(path))
    return model.eval()
