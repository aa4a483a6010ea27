"""SAM's two-way transformer and random-Fourier position encoding, used by the QDMD decoder.

Key names follow SAM's ``mask_decoder.transformer.*`` and ``prompt_encoder.pe_layer.*``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from espmedsam.models.common import MLPBlock


class PositionEmbeddingRandom(nn.Module):
    """Random-Fourier position encoding of a (H, W) grid, computed for the grid actually used."""

    def __init__(self, num_pos_feats: int = 128, scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn(2, num_pos_feats))

    def forward(self, height: int, width: int) -> torch.Tensor:
        """(2·num_pos_feats, H, W) encoding of the cell centres."""
        matrix = self.positional_encoding_gaussian_matrix
        ys = (torch.arange(height, device=matrix.device, dtype=matrix.dtype) + 0.5) / height
        xs = (torch.arange(width, device=matrix.device, dtype=matrix.dtype) + 0.5) / width
        coords = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # H W 2, x first
        return self.encode_coords(coords).permute(2, 0, 1)

    def encode_coords(self, coords: torch.Tensor) -> torch.Tensor:
        """(..., 2) (x, y) in [0, 1] of the image's width and height -> (..., 2·num_pos_feats)."""
        matrix = self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * ((2 * coords.to(matrix.dtype) - 1) @ matrix)
        return torch.cat([coords.sin(), coords.cos()], dim=-1)


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections to ``dim // downsample`` channels."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample: int = 1) -> None:
        super().__init__()
        internal_dim = embedding_dim // downsample
        if internal_dim % num_heads:
            raise ValueError(f"num_heads {num_heads} must divide {internal_dim}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(embedding_dim, internal_dim)
        self.k_proj = nn.Linear(embedding_dim, internal_dim)
        self.v_proj = nn.Linear(embedding_dim, internal_dim)
        self.out_proj = nn.Linear(internal_dim, embedding_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # B N C -> B h N d

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, Nq, C), k and v (B, Nk, C) -> (B, Nq, C)."""
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        out = F.scaled_dot_product_attention(q, k, v)
        b, h, n, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * d))


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token->image, MLP, image->token cross-attention (SAM)."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        attention_downsample: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, attention_downsample)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (B, Nq, C), keys (B, Nk, C) -> updated (queries, keys)."""
        if self.skip_first_layer_pe:
            queries = self.norm1(self.self_attn(queries, queries, queries))
        else:
            q = queries + query_pe
            queries = self.norm1(queries + self.self_attn(q, q, queries))
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries + query_pe, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, queries + query_pe, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """SAM's two-way transformer between query tokens and image tokens."""

    def __init__(
        self,
        depth: int = 2,
        embedding_dim: int = 256,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        attention_downsample: int = 2,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(embedding_dim, num_heads, mlp_dim, attention_downsample, i == 0)
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, query_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the transformer.

        Args:
            image_embedding: (B, C, H, W).
            image_pe: (1 or B, C, H, W) position encoding of the image tokens.
            query_tokens: (B, Nq, C); they are also their own position encoding, as in the official code.
        Returns:
            queries (B, Nq, C) and image tokens (B, H·W, C).
        """
        keys = image_embedding.flatten(2).transpose(1, 2)  # B C H W -> B HW C
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = query_tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, query_tokens, key_pe)
        q, k = queries + query_tokens, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys
