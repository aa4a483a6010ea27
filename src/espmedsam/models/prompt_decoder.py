"""The promptable decoder: SAM's mask decoder with its IoU head, reading the same image embedding as QDMD.

QDMD is trained prompt-free, and point or box tokens placed beside a modality's query barely move its mask
(one box per object: +0.007 Dice on CVC-ClinicDB, +0.002 on BUSI, +0.017 on ISIC 2017, 20 test images
each). So prompts get a decoder of their own, imported whole from LiteMedSAM (trained on about 1.5 M
box-prompted medical images): the prompt encoder's point and box embeddings, the IoU token, the four mask
tokens, the transformer, the upscaling, the single-mask hypernetwork and the IoU head. It reads the image
embedding the prompt-free path computed (the modality's controllers included, before the refiner and the
dense prompt), so a correction costs one decoder pass. Key names follow SAM's ``prompt_encoder.*`` and
``mask_decoder.*``; the position encoding is QDMD's (LiteMedSAM's, a fixed buffer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from espmedsam.config import DecoderConfig
from espmedsam.models.common import HyperMLP, output_upscaling
from espmedsam.models.prompt import PromptEncoder
from espmedsam.models.transformer import PositionEmbeddingRandom, TwoWayTransformer

NUM_MASK_TOKENS = 4  # SAM's: one single-mask output and three multi-mask ones (only the first is decoded)


@dataclass(frozen=True)
class PromptedMasks:
    """What one prompted decoder pass returns."""

    masks: torch.Tensor  # (B, 1, 4h, 4w) low-resolution mask logits
    iou: torch.Tensor  # (B,) the IoU head's estimate of the mask's IoU with the object


class MaskDecoder(nn.Module):
    """SAM's mask decoder, single-mask output: (B, C, h, w) embedding + (B, N, C) prompt tokens -> mask
    logits and predicted IoU."""

    def __init__(
        self,
        embed_dim: int = 256,
        depth: int = 2,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        upscale_dims: tuple[int, int] = (64, 32),
        iou_head_hidden_dim: int = 256,
        attention_downsample: int = 2,
    ) -> None:
        super().__init__()
        self.transformer = TwoWayTransformer(depth, embed_dim, num_heads, mlp_dim, attention_downsample)
        self.iou_token = nn.Embedding(1, embed_dim)
        self.mask_tokens = nn.Embedding(NUM_MASK_TOKENS, embed_dim)
        self.output_upscaling = output_upscaling(embed_dim, *upscale_dims)
        self.output_hypernetworks_mlps = nn.ModuleList([HyperMLP(embed_dim, embed_dim, upscale_dims[-1])])
        self.iou_prediction_head = HyperMLP(embed_dim, iou_head_hidden_dim, NUM_MASK_TOKENS)

    def forward(
        self, embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor
    ) -> PromptedMasks:
        """(B, C, h, w) embeddings with the dense prompt added, (1, C, h, w) position encoding and
        (B, N, C) sparse prompt tokens -> PromptedMasks of the single-mask output."""
        b, c, h, w = embeddings.shape
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight])
        tokens = torch.cat([output_tokens[None].expand(b, -1, -1), sparse], dim=1).to(embeddings.dtype)
        queries, keys = self.transformer(embeddings, image_pe.to(embeddings.dtype), tokens)
        upscaled = self.output_upscaling(keys.transpose(1, 2).reshape(b, c, h, w))
        weights = self.output_hypernetworks_mlps[0](queries[:, 1])
        masks = torch.einsum("bc,bchw->bhw", weights, upscaled).unsqueeze(1)
        iou = self.iou_prediction_head(queries[:, 0])[:, 0]
        return PromptedMasks(masks=masks, iou=iou)


class PromptDecoder(nn.Module):
    """Points and boxes on an image embedding -> one mask and its predicted IoU per prompt.

    Args:
        embed_dim: the image embedding's channels.
        config: the transformer's and upscaling's sizes: QDMD's (both are SAM's mask decoder).
    """

    def __init__(self, embed_dim: int = 256, config: DecoderConfig = DecoderConfig()) -> None:
        super().__init__()
        self.prompt_encoder = PromptEncoder(embed_dim)
        self.mask_decoder = MaskDecoder(
            embed_dim,
            config.depth,
            config.num_heads,
            config.mlp_dim,
            config.upscale_dims,
            attention_downsample=config.attention_downsample,
        )

    def forward(
        self,
        embeddings: torch.Tensor,
        pe_layer: PositionEmbeddingRandom,
        size: int,
        points: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
    ) -> PromptedMasks:
        """Decode one prompt per image.

        Args:
            embeddings: (B, C, h, w) image embedding (the encoder's output, controllers included).
            pe_layer: the position encoding of the image grid and the prompt coordinates.
            size: S, the square model input's side.
            points, labels, boxes: as ``PromptEncoder.forward``, in model-input pixels.
        Returns:
            PromptedMasks with (B, 1, h·4, w·4) logits and (B,) predicted IoU.
        """
        sparse = self.prompt_encoder(pe_layer, size, points, labels, boxes)
        dense = self.prompt_encoder.no_mask_embed.weight.view(1, -1, 1, 1)
        image_pe = pe_layer(*embeddings.shape[-2:]).unsqueeze(0)
        return self.mask_decoder(embeddings + dense.to(embeddings.dtype), image_pe, sparse)
