"""QDMD: the query-decoupled modality decoder (paper-notes §4).

SAM's two-way transformer and upscaling, with one learned query and one hypernetwork per modality: each
image is decoded through the channel of its own modality ("one-to-one"). By default an image's own query
is the only token in the transformer, so the channels are fully independent; the official layout lets all
queries attend to each other and shares one hypernetwork.
"""

from __future__ import annotations

import torch
from torch import nn

from espmedsam.config import DecoderConfig
from espmedsam.models.common import HyperMLP, output_upscaling
from espmedsam.models.controller import gathered_linear, trace_safe_routing
from espmedsam.models.detail import DetailBranch
from espmedsam.models.transformer import PositionEmbeddingRandom, TwoWayTransformer


class QueryDecoupledDecoder(nn.Module):
    """Decodes one low-resolution mask per image from its embedding and its modality's query."""

    def __init__(
        self,
        num_modalities: int,
        embed_dim: int = 256,
        config: DecoderConfig = DecoderConfig(),
        detail_branch: DetailBranch | None = None,
    ) -> None:
        super().__init__()
        self.detail_branch = detail_branch  # None: the mask comes from the embedding alone
        self.num_modalities = num_modalities
        self.decode_all_queries = config.decode_all_queries
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.transformer = TwoWayTransformer(
            config.depth, embed_dim, config.num_heads, config.mlp_dim, config.attention_downsample
        )
        self.mask_query = nn.Embedding(num_modalities + config.extra_queries, embed_dim)
        mid, out = config.upscale_dims
        self.output_upscaling = output_upscaling(embed_dim, mid, out)
        num_mlps = 1 if config.shared_hypernetwork else num_modalities
        self.output_hypernetworks_mlps = nn.ModuleList(
            HyperMLP(embed_dim, embed_dim, out) for _ in range(num_mlps)
        )

    def forward(
        self, embeddings: torch.Tensor, modality: torch.Tensor, images: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mask logits of each image's own modality.

        Args:
            embeddings: (B, C, h, w) image embedding with the dense prompt added.
            modality: (B,) int64 modality ids.
            images: the (B, 3, S, S) model inputs, which a decoder with a detail branch needs.
        Returns:
            (B, 1, 4h, 4w) low-resolution mask logits.
        """
        b, c, h, w = embeddings.shape
        image_pe = self.pe_layer(h, w).unsqueeze(0).to(embeddings.dtype)
        if self.decode_all_queries:
            tokens = self.mask_query.weight.unsqueeze(0).expand(b, -1, -1)
            own = modality
        else:
            tokens = self.mask_query(modality).unsqueeze(1)
            own = torch.zeros_like(modality)
        queries, keys = self.transformer(embeddings, image_pe, tokens.to(embeddings.dtype))
        upscaled = self.output_upscaling(keys.transpose(1, 2).reshape(b, c, h, w))
        if self.detail_branch is not None:
            if images is None:
                raise ValueError("a decoder with a detail branch needs the input images")
            upscaled = self.detail_branch(images, upscaled)
        own_query = queries[torch.arange(b, device=queries.device), own]  # (B, C)
        weights = self._hypernetwork(own_query, modality)  # (B, C_up)
        return torch.einsum("bc,bchw->bhw", weights, upscaled).unsqueeze(1)

    def _hypernetwork(self, query: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """(B, C) query of each image -> (B, C_up) mask weights through its modality's MLP."""
        mlps = self.output_hypernetworks_mlps
        if len(mlps) == 1:
            return mlps[0](query)
        if trace_safe_routing():
            return self._hypernetwork_gathered(query, modality)
        ids = modality.tolist()
        if len(set(ids)) == 1:
            return mlps[ids[0]](query)
        return torch.stack([mlps[m](query[i]) for i, m in enumerate(ids)])

    def _hypernetwork_gathered(self, query: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """``_hypernetwork`` without Python ints: each image's MLP weights gathered by its modality."""
        mlps = self.output_hypernetworks_mlps
        x = query.unsqueeze(1)  # (B, 1, C)
        depth = len(mlps[0].layers)
        for i in range(depth):
            x = gathered_linear(x, [mlp.layers[i] for mlp in mlps], modality)
            x = x if i == depth - 1 else torch.relu(x)
        return x.squeeze(1)
