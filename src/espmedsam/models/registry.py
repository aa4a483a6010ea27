"""Named model configurations and ``build_model``, the one place where config numbers become modules."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from espmedsam.config import (
    IMAGENET_MEAN,
    ControllerConfig,
    DecoderConfig,
    EncoderConfig,
    ModelConfig,
    RefinerConfig,
    SPPGConfig,
)
from espmedsam.errors import ConfigError
from espmedsam.models.classifier import ModalityClassifier
from espmedsam.models.click_decoder import ClickDecoder
from espmedsam.models.detail import DetailBranch
from espmedsam.models.espmedsam import ESPMedSAM
from espmedsam.models.prompt_decoder import PromptDecoder
from espmedsam.models.qdmd import QueryDecoupledDecoder
from espmedsam.models.quality import MaskQuality
from espmedsam.models.refiner import EmbeddingRefiner
from espmedsam.models.sppg import SelfPatchPromptGenerator
from espmedsam.models.tinyvit import TinyViT


def default_config() -> ModelConfig:
    """Six modalities, six controllers, per-modality queries and hypernetworks."""
    return ModelConfig()


def official_config() -> ModelConfig:
    """The official checkpoints' layout (paper-notes §8, official_forward.md).

    One controller for every modality, 7 queries all joining the transformer, one shared hypernetwork,
    fixed windows with padding, and the official normalisation x / mean - 1.
    """
    return ModelConfig(
        name="official",
        pixel_std=IMAGENET_MEAN,
        encoder=EncoderConfig(balanced_windows=False),
        controller=ControllerConfig(shared=True),
        decoder=DecoderConfig(extra_queries=1, shared_hypernetwork=True, decode_all_queries=True),
    )


def litemedsam_config() -> ModelConfig:
    """Six modalities on LiteMedSAM's TinyViT: pointwise stem (output stride 4), fixed windows with padding,
    per-image min-max input normalisation, 256² by default (a 64 x 64 embedding), and a two-block embedding
    refiner, which lets a decoder trained on a frozen encoder mix neighbouring positions."""
    return ModelConfig(
        name="litemedsam",
        image_size=256,
        input_normalisation="minmax",
        encoder=EncoderConfig(stem="pointwise", balanced_windows=False),
        refiner=RefinerConfig(depth=2),
    )


def tiny_config() -> ModelConfig:
    """A few-thousand-parameter model with the same structure, for tests."""
    return ModelConfig(
        name="tiny",
        image_size=64,
        encoder=EncoderConfig(
            embed_dims=(8, 16, 16, 32), depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 2), out_chans=32
        ),
        controller=ControllerConfig(adapter_ratio=1.0),
        sppg=SPPGConfig(hidden_dim=8),
        decoder=DecoderConfig(depth=2, num_heads=2, mlp_dim=32, upscale_dims=(8, 4)),
    )


CONFIGS: dict[str, Callable[[], ModelConfig]] = {
    "default": default_config,
    "official": official_config,
    "litemedsam": litemedsam_config,
    "tiny": tiny_config,
}


def get_config(name: str) -> ModelConfig:
    """The named configuration.

    Raises:
        ConfigError: an unknown name.
    """
    if name not in CONFIGS:
        raise ConfigError(f"unknown model {name!r}; expected one of {', '.join(CONFIGS)}")
    return CONFIGS[name]()


def build_model(config: ModelConfig | str = "default") -> ESPMedSAM:
    """A freshly initialised model in eval mode.

    Raises:
        ConfigError: an unknown name or an inconsistent configuration.
    """
    if isinstance(config, str):
        config = get_config(config)
    num_controllers = 1 if config.controller.shared else len(config.modalities)
    num_controllers = num_controllers if config.controller.enabled else 0
    encoder = TinyViT(config.encoder, num_controllers=num_controllers, controller=config.controller)
    sppg = SelfPatchPromptGenerator(
        config.encoder.out_chans, config.sppg.hidden_dim, threshold=config.sppg.threshold
    )
    detail = None
    if config.detail.enabled:  # the upscaled features have 4x the embedding's resolution
        stride = max(1, config.encoder.output_stride // 4)
        detail = DetailBranch(config.decoder.upscale_dims[-1], config.detail.hidden_dim, stride)
    decoder = QueryDecoupledDecoder(
        len(config.modalities), config.encoder.out_chans, config.decoder, detail_branch=detail
    )
    refiner = EmbeddingRefiner(config.encoder.out_chans, **dataclasses.asdict(config.refiner))
    classifier = None
    if config.classifier.enabled:
        head = config.classifier
        classifier = ModalityClassifier(
            config.encoder.out_chans,
            len(config.modalities),
            head.hidden_dim,
            statistics_rank=head.statistics_rank if head.statistics else 0,
        )
    prompt_decoder = None
    if config.prompt.enabled:
        prompt_decoder = PromptDecoder(config.encoder.out_chans, config.decoder)
    click_decoder = None
    if config.prompt.enabled and config.prompt.clicks:
        click_decoder = ClickDecoder(config.encoder.out_chans, config.decoder)
    quality = None
    if config.quality.enabled:
        quality = MaskQuality(len(config.modalities), config.quality.max_components)
    parts = (refiner, classifier, prompt_decoder, quality, click_decoder)
    return ESPMedSAM(config, encoder, sppg, decoder, *parts).eval()
