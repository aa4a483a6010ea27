"""The encoder traced for an exported graph (``graph_layout``) computes what the eager encoder does."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from espmedsam.models.common import LayerNorm2d
from espmedsam.models.controller import gathered_routing
from espmedsam.models.graph_layout import _GRAPH_LAYOUT, channels_first, channels_last, graph_layout
from espmedsam.models.registry import build_model, tiny_config
from espmedsam.models.tinyvit import TinyViTBlock, WindowAttention


def _pointwise_tiny():
    config = tiny_config()
    return dataclasses.replace(config, encoder=dataclasses.replace(config.encoder, stem="pointwise"))


@pytest.mark.parametrize("side", [40, 64, 72])
def test_the_graph_layout_gives_the_eager_masks_and_embeddings(side):
    torch.manual_seed(0)
    model = build_model(_pointwise_tiny()).eval()
    images = torch.randn(2, 3, side, side)
    with torch.no_grad():
        eager = model(images, ["xray", "fundus"])
        with graph_layout():
            traced = model(images, ["xray", "fundus"])
    torch.testing.assert_close(traced.embeddings, eager.embeddings, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(traced.masks, eager.masks, rtol=1e-4, atol=1e-4)


def test_the_graph_layout_with_gathered_routing_gives_the_eager_masks():
    torch.manual_seed(2)
    model = build_model(_pointwise_tiny()).eval()
    images = torch.randn(3, 3, 56, 56)
    modalities = ["xray", "fundus", "xray"]
    with torch.no_grad():
        eager = model(images, modalities)
        with gathered_routing(), graph_layout():
            traced = model(images, modalities)
    torch.testing.assert_close(traced.masks, eager.masks, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prompt_batch", [None, 1, 2])
def test_the_graph_attention_equals_the_fused_kernel(prompt_batch):
    """Explicit multi-head attention with separate q/k/v matmuls = the eager SDPA path, with prompt
    tokens shared by the batch (1), one set per image (2), or none."""
    torch.manual_seed(3)
    attention = WindowAttention(24, 3, 4).eval()
    torch.nn.init.normal_(attention.attention_biases)
    windows_per_image = 3
    x = torch.randn(2 * windows_per_image, 12, 24)  # 2 images, 3 windows of 3 x 4 tokens each
    prompts = None
    if prompt_batch:
        prompts = (torch.randn(prompt_batch, 3, 2, 8), torch.randn(prompt_batch, 1, 1, 2))
    with torch.no_grad():
        eager = attention(x, (3, 4), prompts, windows_per_image)
        with graph_layout():
            traced = attention(x, (3, 4), prompts, windows_per_image)
    torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-5)


def test_the_padded_local_conv_equals_cutting_first():
    torch.manual_seed(1)
    block = TinyViTBlock(16, 2, 7).eval()
    x = torch.randn(1, 10, 9, 16)  # 10 x 9 tokens: windows of 5 x 5, so 0 and 1 rows/columns of padding
    with torch.no_grad():
        eager = block(x, None)
        with graph_layout():
            traced = block(x, None)
    torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-5)


def test_channels_first_is_a_view_outside_the_graph_layout_and_restored_after():
    x = torch.randn(2, 3, 4, 5)
    assert channels_first(x).data_ptr() == x.data_ptr() and channels_first(x).shape == (2, 5, 3, 4)
    with graph_layout():
        assert _GRAPH_LAYOUT[0]
        torch.testing.assert_close(channels_first(x), x.permute(0, 3, 1, 2))
    assert not _GRAPH_LAYOUT[0]


def test_channels_last_is_a_view_outside_the_graph_layout():
    x = torch.randn(2, 5, 3, 4)
    assert channels_last(x).data_ptr() == x.data_ptr() and channels_last(x).shape == (2, 3, 4, 5)
    with graph_layout():
        torch.testing.assert_close(channels_last(x), x.permute(0, 2, 3, 1))


def test_the_channel_layernorm_in_the_graph_layout_is_the_eager_one():
    torch.manual_seed(0)
    norm = LayerNorm2d(12)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 12, 5, 7) * 3 + 1
    eager = norm(x)
    with graph_layout():
        traced = norm(x)
    torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-5)
