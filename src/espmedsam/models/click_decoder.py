"""The click decoder: clicks and the mask so far -> the corrected mask, SAM's interactive way.

LiteMedSAM's decoder (``prompt_decoder.py``) was trained with boxes alone: a click by itself gives a
near-empty mask, so it cannot correct one. The click decoder is a copy of it that also reads the mask
being corrected, through SAM's mask-prompt encoder (``mask_downscaling``: two stride-2 convolutions to the
embedding's grid, added to the dense prompt), and is trained with simulated clicks on the cached
embeddings (``train/clicks.py``, ``espmedsam prompts train-clicks``).

Its output is a *correction* of the mask it is given: logits = clip(mask so far) + decoded change. Its
hypernetwork's last layer starts at zero, so an untrained click decoder returns the mask unchanged;
training starts from the prompt-free result and the decoder learns where a click should change it,
instead of redrawing the whole mask from a 4x coarser grid (the prompt-free mask keeps the detail branch's
full-resolution boundary wherever nothing is clicked).
The box decoder is left as it is, so boxes, ``--refine self`` and the quality score keep their figures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from espmedsam.config import DecoderConfig
from espmedsam.models.common import LayerNorm2d
from espmedsam.models.prompt_decoder import PromptDecoder, PromptedMasks
from espmedsam.models.transformer import PositionEmbeddingRandom

MASK_IN_CHANS = 16  # SAM's mask_in_chans
LOGIT_CLIP = 8.0  # the mask so far enters as logits clipped to +-this: confident, but correctable


def mask_downscaling(embed_dim: int, mask_in_chans: int = MASK_IN_CHANS) -> nn.Sequential:
    """SAM's mask-prompt encoder: (B, 1, 4h, 4w) mask logits -> (B, C, h, w) dense prompt."""
    return nn.Sequential(
        nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
        LayerNorm2d(mask_in_chans // 4),
        nn.GELU(),
        nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
        LayerNorm2d(mask_in_chans),
        nn.GELU(),
        nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
    )


class ClickDecoder(PromptDecoder):
    """Clicks on an image embedding, with the mask they correct -> the corrected mask and its predicted IoU.

    Args:
        embed_dim: the image embedding's channels.
        config: the transformer's and upscaling's sizes (the promptable decoder's, which it starts from).
    """

    def __init__(self, embed_dim: int = 256, config: DecoderConfig = DecoderConfig()) -> None:
        super().__init__(embed_dim, config)
        self.mask_downscaling = mask_downscaling(embed_dim)
        self.start_unchanged()

    def start_unchanged(self) -> None:
        """Zero the mask prompt's last convolution and the hypernetwork's last layer: the decoder then
        adds nothing to the dense prompt and changes no pixel, until it is trained."""
        for layer in (self.mask_downscaling[-1], self.mask_decoder.output_hypernetworks_mlps[0].layers[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(  # type: ignore[override]
        self,
        embeddings: torch.Tensor,
        pe_layer: PositionEmbeddingRandom,
        size: int,
        points: torch.Tensor,
        labels: torch.Tensor,
        mask_logits: torch.Tensor,
    ) -> PromptedMasks:
        """Correct one mask per image.

        Args:
            embeddings: (B, C, h, w) image embedding (the encoder's output, controllers included).
            pe_layer: the position encoding of the image grid and the click coordinates.
            size: S, the square model input's side.
            points: (B, P, 2) float (x, y) in model-input pixels; labels: (B, P) int64, 1 foreground,
                0 background, -1 no click (padding, for images of a batch with fewer clicks).
            mask_logits: (B, 1, S, S) logits of the mask so far (the prompt-free mask's, at first).
        Returns:
            PromptedMasks with (B, 1, S, S) corrected logits and (B,) predicted IoU.
        """
        h, w = embeddings.shape[-2:]
        sparse = self.prompt_encoder(pe_layer, size, points, labels)
        before = mask_logits.float().clamp(-LOGIT_CLIP, LOGIT_CLIP)
        grid = F.interpolate(before, size=(4 * h, 4 * w), mode="bilinear", align_corners=False)
        dense = self.prompt_encoder.no_mask_embed.weight.view(1, -1, 1, 1) + self.mask_downscaling(
            grid.to(embeddings.dtype)
        )
        image_pe = pe_layer(h, w).unsqueeze(0)
        out = self.mask_decoder(embeddings + dense.to(embeddings.dtype), image_pe, sparse)
        change = F.interpolate(
            out.masks.float(), size=before.shape[-2:], mode="bilinear", align_corners=False
        )
        return PromptedMasks(masks=before + change, iou=out.iou)

    @classmethod
    def from_prompt_decoder(
        cls, source: PromptDecoder, embed_dim: int, config: DecoderConfig
    ) -> ClickDecoder:
        """A click decoder starting from ``source``'s weights (the box decoder's: its transformer already
        reads this image embedding), changing no pixel until it is trained (``start_unchanged``)."""
        decoder = cls(embed_dim, config)
        missing, unexpected = decoder.load_state_dict(source.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("mask_downscaling.") for k in missing), missing
        decoder.start_unchanged()
        return decoder.to(next(source.parameters()).device)
