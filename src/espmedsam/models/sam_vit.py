"""SAM ViT image encoder (ViT-B/L/H), the distillation teacher, runnable at any input size.

A faithful copy of ``segment_anything``'s ``ImageEncoderViT``: key names equal SAM's ``image_encoder.*``
names without the prefix, so SAM and MedSAM weights load by name. Unlike SAM, the input size is read from
the tensor: the absolute position embedding is interpolated bicubically to the token grid, and the
relative-position tables of global blocks linearly to ``2 * grid - 1`` (SAM's ``get_rel_pos``). At the
pretraining size both are used as stored, so outputs equal SAM's. Token maps between blocks are (B, H, W, C).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from espmedsam.errors import ConfigError, InputError
from espmedsam.models.common import LayerNorm2d, MLPBlock


@dataclasses.dataclass(frozen=True)
class SamViTConfig:
    """Sizes of a SAM ViT image encoder; the defaults are ViT-B.

    ``global_attn_indexes`` lists the blocks with global attention, the others attend inside
    ``window_size`` x ``window_size`` windows. ``pretrain_img_size`` fixes the stored position grids.
    """

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    patch_size: int = 16
    out_chans: int = 256
    pretrain_img_size: int = 1024
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} is not a multiple of num_heads {self.num_heads}")
        if any(not 0 <= i < self.depth for i in self.global_attn_indexes):
            raise ConfigError(f"global_attn_indexes {self.global_attn_indexes} not all in [0, {self.depth})")
        if self.pretrain_img_size % self.patch_size:
            size, patch = self.pretrain_img_size, self.patch_size
            raise ConfigError(f"pretrain_img_size {size} is not a multiple of patch_size {patch}")

    @classmethod
    def vit_b(cls) -> SamViTConfig:
        return cls(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11))

    @classmethod
    def vit_l(cls) -> SamViTConfig:
        return cls(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23))

    @classmethod
    def vit_h(cls) -> SamViTConfig:
        return cls(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31))

    @classmethod
    def tiny(cls) -> SamViTConfig:
        """Two blocks (one windowed, one global) of width 32 at a 64-pixel pretraining size, for tests."""
        return cls(
            embed_dim=32,
            depth=2,
            num_heads=2,
            global_attn_indexes=(1,),
            window_size=4,
            out_chans=32,
            pretrain_img_size=64,
        )

    @classmethod
    def from_variant(cls, name: str) -> SamViTConfig:
        """The config named ``name`` in ``SAM_VIT_VARIANTS``; raises ConfigError for an unknown name."""
        if name not in SAM_VIT_VARIANTS:
            raise ConfigError(f"unknown SAM ViT variant {name!r}; expected one of {sorted(SAM_VIT_VARIANTS)}")
        return SAM_VIT_VARIANTS[name]()


SAM_VIT_VARIANTS: dict[str, Callable[[], SamViTConfig]] = {
    "vit_b": SamViTConfig.vit_b,
    "vit_l": SamViTConfig.vit_l,
    "vit_h": SamViTConfig.vit_h,
    "tiny": SamViTConfig.tiny,
}


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: (B, C_in, H, W) -> (B, H/p, W/p, C)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # B C H W -> B H W C


class Attention(nn.Module):
    """Multi-head self-attention with SAM's decomposed relative-position bias.

    The qkv channels are laid out as q of all heads, then k, then v. ``rel_pos_h`` / ``rel_pos_w`` hold
    ``2 * size - 1`` rows of ``head_dim``; ``size`` is the window side or the pretraining token grid.
    """

    def __init__(self, dim: int, num_heads: int, rel_pos_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        batch, height, width, _ = x.shape
        # B H W 3C -> 3 B heads HW d
        qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (height, width), (height, width))
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        # B heads HW d -> B H W (heads d)
        return self.proj(x.transpose(1, 2).reshape(batch, height, width, -1))


class Block(nn.Module):
    """Pre-norm transformer block; windowed attention (zero-padded windows) when ``window_size`` > 0."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, window_size: int, global_grid_size: int
    ) -> None:
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.norm1 = norm(dim)
        self.attn = Attention(dim, num_heads, window_size if window_size > 0 else global_grid_size)
        self.norm2 = norm(dim)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), nn.GELU)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            height, width = x.shape[1], x.shape[2]
            x, padded_hw = window_partition(x, self.window_size)
            x = self.attn(x)
            x = window_unpartition(x, self.window_size, padded_hw, (height, width))
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class SamViTEncoder(nn.Module):
    """SAM's ViT image encoder: patch embedding, transformer blocks, convolutional neck to ``out_chans``."""

    def __init__(self, config: SamViTConfig, in_chans: int = 3) -> None:
        super().__init__()
        self.config = config
        grid = config.pretrain_img_size // config.patch_size
        self.patch_embed = PatchEmbed(config.patch_size, in_chans, config.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, config.embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                config.embed_dim,
                config.num_heads,
                config.mlp_ratio,
                window_size=0 if i in config.global_attn_indexes else config.window_size,
                global_grid_size=grid,
            )
            for i in range(config.depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(config.embed_dim, config.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(config.out_chans),
            nn.Conv2d(config.out_chans, config.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(config.out_chans),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings.

        Args:
            images: (B, 3, H, W) float, normalised with SAM's pixel statistics; H, W multiples of
                ``config.patch_size`` (SAM's protocol: H = W = 1024).

        Returns:
            (B, out_chans, H / patch_size, W / patch_size) float embeddings.

        Raises:
            InputError: ``images`` is not (B, in_chans, H, W) with H and W multiples of the patch size.
        """
        self._check_input(images)
        x = self.patch_embed(images)
        x = x + interpolate_pos_embed(self.pos_embed, (x.shape[1], x.shape[2]))
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))  # B H W C -> B C H W

    def _check_input(self, images: torch.Tensor) -> None:
        in_chans = self.patch_embed.proj.in_channels
        patch = self.config.patch_size
        if images.ndim != 4 or images.shape[1] != in_chans:
            raise InputError(f"images must be (B, {in_chans}, H, W), got {tuple(images.shape)}")
        if images.shape[2] % patch or images.shape[3] % patch:
            raise InputError(
                f"image size {tuple(images.shape[2:])} is not a multiple of the patch size {patch}"
            )


def interpolate_pos_embed(pos_embed: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """(1, h, w, C) absolute embedding -> (1, H, W, C), bicubic; returned as is when the grid matches."""
    if tuple(pos_embed.shape[1:3]) == grid_hw:
        return pos_embed
    resized = F.interpolate(pos_embed.permute(0, 3, 1, 2), size=grid_hw, mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1)  # 1 C H W -> 1 H W C


def window_partition(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * nW, ws, ws, C) windows after zero padding at the bottom/right, and (Hp, Wp)."""
    batch, height, width, channels = x.shape
    pad_h = (window_size - height % window_size) % window_size
    pad_w = (window_size - width % window_size) % window_size
    if pad_h > 0 or pad_w > 0:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = height + pad_h, width + pad_w
    x = x.view(batch, hp // window_size, window_size, wp // window_size, window_size, channels)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, channels)
    return windows, (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window_size: int, padded_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """(B * nW, ws, ws, C) windows -> (B, H, W, C), dropping the padding."""
    hp, wp = padded_hw
    height, width = hw
    batch = windows.shape[0] // (hp * wp // window_size // window_size)
    x = windows.view(batch, hp // window_size, wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, hp, wp, -1)
    if hp > height or wp > width:
        x = x[:, :height, :width, :].contiguous()
    return x


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative-position rows for every (query, key) pair, as SAM's ``get_rel_pos``: (q, k, d).

    The (L, d) table is linearly interpolated to ``2 * max(q_size, k_size) - 1`` rows when needed.
    """
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        # L d -> 1 d L for 1-D interpolation along the table
        resized = F.interpolate(
            rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=max_rel_dist, mode="linear"
        )
        rel_pos = resized.reshape(-1, max_rel_dist).permute(1, 0)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative_coords = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative_coords.long()]


def decomposed_rel_pos_bias(
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    q_size: tuple[int, int],
    k_size: tuple[int, int],
) -> torch.Tensor:
    """SAM's decomposed relative-position attention bias (``add_decomposed_rel_pos`` without the add).

    Args:
        q: (B, heads, q_h * q_w, d) unscaled queries.
        rel_pos_h, rel_pos_w: (L_h, d) and (L_w, d) tables.
        q_size, k_size: (q_h, q_w) and (k_h, k_w) token grids.

    Returns:
        (B, heads, q_h * q_w, k_h * k_w) bias to add to the scaled logits.
    """
    (q_h, q_w), (k_h, k_w) = q_size, k_size
    rh = get_rel_pos(q_h, k_h, rel_pos_h).to(q.dtype)
    rw = get_rel_pos(q_w, k_w, rel_pos_w).to(q.dtype)
    batch, heads, _, dim = q.shape
    r_q = q.reshape(batch, heads, q_h, q_w, dim)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rh)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rw)
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # B heads q_h q_w k_h k_w
    return bias.reshape(batch, heads, q_h * q_w, k_h * k_w)
