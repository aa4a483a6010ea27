"""Optional point and box prompts, SAM's way: each becomes sparse tokens for the promptable decoder
(``models/prompt_decoder.py``), with SAM's "no mask" embedding as its dense prompt.

The prompt-free path never meets this module. Key names follow SAM's ``prompt_encoder.*``; the position
encoding is QDMD's ``pe_layer``, passed in (SAM's prompt encoder and mask decoder share one too).
"""

from __future__ import annotations

import torch
from torch import nn

from espmedsam.models.transformer import PositionEmbeddingRandom

BACKGROUND, FOREGROUND = 0, 1  # point labels, as SAM's
_PADDING = -1  # SAM's "not a point", which pads a points-only prompt


class PromptEncoder(nn.Module):
    """Points and boxes in model-input pixels -> (B, N, C) sparse prompt tokens.

    Args:
        embed_dim: C, the decoder's token width.
    """

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        # background point, foreground point, box top-left corner, box bottom-right corner
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.no_mask_embed = nn.Embedding(1, embed_dim)  # the dense prompt: added to every image token

    def forward(
        self,
        pe_layer: PositionEmbeddingRandom,
        size: int,
        points: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sparse tokens of one prompt per image.

        Args:
            pe_layer: the decoder's position encoding (the coordinates get what the image grid gets).
            size: S, the square model input's side the coordinates are in.
            points: (B, P, 2) float (x, y) in model-input pixels; labels: (B, P) int64, 1 foreground,
                0 background.
            boxes: (B, 4) float (x0, y0, x1, y1) in model-input pixels, or None.
        Returns:
            (B, N, C) tokens: P + 1 for points alone (SAM's padding point), 2 per box, P + 2 for both.
        """
        tokens = []
        if points is not None:
            if labels is None:
                raise ValueError("points need labels")
            tokens.append(self._embed_points(pe_layer, points, labels, size, pad=boxes is None))
        if boxes is not None:
            tokens.append(self._embed_boxes(pe_layer, boxes, size))
        if not tokens:
            raise ValueError("a prompt needs points or a box")
        return torch.cat(tokens, dim=1)

    def _embed_points(
        self,
        pe_layer: PositionEmbeddingRandom,
        points: torch.Tensor,
        labels: torch.Tensor,
        size: int,
        pad: bool,
    ) -> torch.Tensor:
        points = points + 0.5  # the pixel's centre
        if pad:
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), _PADDING)], dim=1)
        embedding = pe_layer.encode_coords(points.float() / size)
        embedding = torch.where((labels == _PADDING)[..., None], torch.zeros_like(embedding), embedding)
        for label, weight in (
            (_PADDING, self.not_a_point_embed.weight),
            (BACKGROUND, self.point_embeddings[0].weight),
            (FOREGROUND, self.point_embeddings[1].weight),
        ):
            embedding = embedding + (labels == label)[..., None] * weight
        return embedding

    def _embed_boxes(self, pe_layer: PositionEmbeddingRandom, boxes: torch.Tensor, size: int) -> torch.Tensor:
        corners = pe_layer.encode_coords((boxes.reshape(-1, 2, 2).float() + 0.5) / size)
        offsets = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight])
        return corners + offsets
