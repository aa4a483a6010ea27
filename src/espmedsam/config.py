"""Model configuration: one frozen dataclass per component, exact dict/JSON/YAML round trips.

Every field has a default (the paper's value); unknown or mistyped keys raise ``ConfigError`` naming
their dotted path.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from espmedsam.errors import ConfigError
from espmedsam.modalities import MODALITIES

T = TypeVar("T")

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Shared TinyViT-5M of MobileSAM (paper-notes §2)."""

    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    merge_strides: tuple[int, ...] = (2, 2, 1)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    out_chans: int = 256
    balanced_windows: bool = True  # split each axis into equal windows <= w; official: fixed w + padding

    def __post_init__(self) -> None:
        stages = len(self.embed_dims)
        lengths = {
            "depths": len(self.depths),
            "num_heads": len(self.num_heads),
            "window_sizes": len(self.window_sizes),
        }
        lengths["merge_strides"] = len(self.merge_strides) + 1
        wrong = [f"{k} ({v if k != 'merge_strides' else v - 1})" for k, v in lengths.items() if v != stages]
        if wrong or stages < 2:
            raise ConfigError(
                f"encoder: embed_dims gives {stages} stages (at least 2); "
                "depths, num_heads and window_sizes need one "
                f"entry per stage and merge_strides one fewer; mismatched: {', '.join(wrong) or 'none'}"
            )
        for dim, heads in zip(self.embed_dims, self.num_heads, strict=True):
            if dim % heads:
                raise ConfigError(f"encoder: num_heads {heads} does not divide embed_dim {dim}")


@dataclasses.dataclass(frozen=True)
class ControllerConfig:
    """Modality controllers inside every attention block (paper-notes §2)."""

    num_prompt_tokens: int = 1
    adapter_ratio: float = 4.0
    shared: bool = False  # official layout: one controller used for every modality


@dataclasses.dataclass(frozen=True)
class SPPGConfig:
    """Self-patch prompt generator (paper-notes §3)."""

    hidden_dim: int = 64
    threshold: float = 0.5


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Query-decoupled modality decoder (paper-notes §4)."""

    depth: int = 2
    num_heads: int = 8
    mlp_dim: int = 2048
    attention_downsample: int = 2
    upscale_dims: tuple[int, ...] = (64, 32)
    extra_queries: int = 0  # official layout: 1 (7 queries, the last never decoded)
    shared_hypernetwork: bool = False  # official layout: one MLP for all queries
    decode_all_queries: bool = False  # official: every query joins the transformer; ours: the image's own


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The whole ESP-MedSAM network and its input convention."""

    name: str = "default"
    modalities: tuple[str, ...] = MODALITIES
    image_size: int = 1024
    pixel_mean: tuple[float, ...] = IMAGENET_MEAN
    pixel_std: tuple[float, ...] = IMAGENET_STD
    encoder: EncoderConfig = EncoderConfig()
    controller: ControllerConfig = ControllerConfig()
    sppg: SPPGConfig = SPPGConfig()
    decoder: DecoderConfig = DecoderConfig()

    def __post_init__(self) -> None:
        if self.image_size % 32:
            raise ConfigError(f"image_size must be a multiple of 32, got {self.image_size}")
        if not self.modalities:
            raise ConfigError("modalities must name at least one modality")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return from_dict(cls, data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelConfig:
        return from_dict(cls, _read_yaml(path))


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass as plain dicts, lists and scalars (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; missing fields keep their defaults.

    Raises:
        ConfigError: an unknown key or a value of the wrong type, naming its dotted path.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else key
        if key not in fields:
            raise ConfigError(f"unknown config key {dotted!r}")
        values[key] = _convert(hints[key], value, dotted)
    try:
        return cls(**values)
    except TypeError as error:
        raise ConfigError(f"{path or 'config'}: {error}") from None


def _convert(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    if origin in (typing.Union, types.UnionType):
        options = [h for h in typing.get_args(hint) if h is not type(None)]
        return None if value is None else _convert(options[0], value, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        item = typing.get_args(hint)[0]
        return tuple(_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    return _scalar(hint, value, path)


def _scalar(hint: Any, value: Any, path: str) -> Any:
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (bool, str) and isinstance(value, hint):
        return value
    if hint is Any:
        return value
    raise ConfigError(f"{path} must be {getattr(hint, '__name__', hint)}, got {value!r}")


def _read_yaml(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read config {path}: {error}") from None
    return data or {}
