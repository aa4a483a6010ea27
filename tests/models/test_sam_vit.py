"""SAM ViT image encoder: shapes at several sizes, equality with SAM's plain formulas, SAM's key layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from espmedsam.errors import ConfigError, InputError
from espmedsam.models.sam_vit import (
    Attention,
    SamViTConfig,
    SamViTEncoder,
    window_partition,
    window_unpartition,
)

REFERENCE_TSV = Path(__file__).parents[2].parent / "shared/reference/sam_vit_b_state_dict.tsv"


def _tiny_encoder(seed: int = 0) -> SamViTEncoder:
    """Tiny encoder with every parameter random (SAM initialises pos_embed and rel_pos to zero)."""
    generator = torch.Generator().manual_seed(seed)
    model = SamViTEncoder(SamViTConfig.tiny()).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model


# --- SAM's formulas, written out as in segment_anything/modeling/image_encoder.py -------------------------


def _sam_get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        rel_pos_resized = F.interpolate(
            rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=max_rel_dist, mode="linear"
        )
        rel_pos_resized = rel_pos_resized.reshape(-1, max_rel_dist).permute(1, 0)
    else:
        rel_pos_resized = rel_pos
    q_coords = torch.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    relative_coords = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos_resized[relative_coords.long()]


def _sam_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    batch, height, width, _ = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(batch, height * width, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, batch * heads, height * width, -1).unbind(0)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    rh = _sam_get_rel_pos(height, height, attn.rel_pos_h)
    rw = _sam_get_rel_pos(width, width, attn.rel_pos_w)
    r_q = q.reshape(batch * heads, height, width, -1)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)
    logits = logits.view(batch * heads, height, width, height, width)
    logits = (logits + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).view(
        batch * heads, height * width, height * width
    )
    out = (logits.softmax(dim=-1) @ v).view(batch, heads, height, width, -1).permute(0, 2, 3, 1, 4)
    return attn.proj(out.reshape(batch, height, width, -1))


def _sam_encoder(model: SamViTEncoder, images: torch.Tensor) -> torch.Tensor:
    x = model.patch_embed.proj(images).permute(0, 2, 3, 1)
    pos = model.pos_embed
    if pos.shape[1:3] != x.shape[1:3]:
        pos = F.interpolate(pos.permute(0, 3, 1, 2), size=x.shape[1:3], mode="bicubic").permute(0, 2, 3, 1)
    x = x + pos
    for block in model.blocks:
        shortcut = x
        x = block.norm1(x)
        if block.window_size > 0:
            height, width = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, block.window_size)
            x = window_unpartition(_sam_attention(block.attn, x), block.window_size, pad_hw, (height, width))
        else:
            x = _sam_attention(block.attn, x)
        x = shortcut + x
        x = x + block.mlp.lin2(F.gelu(block.mlp.lin1(block.norm2(x))))
    return model.neck(x.permute(0, 3, 1, 2))


# --- tests --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("batch", "size"), [(2, 64), (1, 96)])
def test_output_shape(batch: int, size: int) -> None:
    model = _tiny_encoder()
    with torch.no_grad():
        out = model(torch.randn(batch, 3, size, size))
    assert out.shape == (batch, 32, size // 16, size // 16)


@pytest.mark.parametrize("size", [64, 96, 48])
def test_matches_sam_formulas(size: int) -> None:
    """At the pretraining size (64) nothing is interpolated; at 96 windows are padded, 48 shrinks tables."""
    model = _tiny_encoder()
    images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(images), _sam_encoder(model, images), rtol=1e-5, atol=1e-5)


def test_window_partition_round_trip() -> None:
    x = torch.randn(2, 6, 5, 3)
    windows, padded = window_partition(x, 4)
    assert windows.shape == (2 * 2 * 2, 4, 4, 3) and padded == (8, 8)
    torch.testing.assert_close(window_unpartition(windows, 4, padded, (6, 5)), x, rtol=0, atol=0)


def test_gradients_reach_every_parameter() -> None:
    model = _tiny_encoder().train()
    model(torch.randn(1, 3, 32, 48)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("shape", [(1, 3, 40, 64), (1, 1, 64, 64), (3, 64, 64)])
def test_bad_input_raises(shape: tuple[int, ...]) -> None:
    with pytest.raises(InputError):
        SamViTEncoder(SamViTConfig.tiny())(torch.zeros(shape))


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="vit_x"):
        SamViTConfig.from_variant("vit_x")
    with pytest.raises(ConfigError):
        SamViTConfig(embed_dim=30, num_heads=4)
    with pytest.raises(ConfigError):
        SamViTConfig(depth=2, global_attn_indexes=(2,))


@pytest.mark.slow
def test_vit_b_keys_and_shapes_equal_sam() -> None:
    if not REFERENCE_TSV.is_file():
        pytest.skip(f"{REFERENCE_TSV} not present")
    expected = {}
    for line in REFERENCE_TSV.read_text().splitlines():
        name, shape, _ = line.split("\t")
        if name.startswith("image_encoder."):
            expected[name.removeprefix("image_encoder.")] = tuple(
                int(n) for n in shape.strip("[]").split(",")
            )
    with torch.device("meta"):
        model = SamViTEncoder(SamViTConfig.from_variant("vit_b"))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
