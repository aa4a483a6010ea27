"""Shared TinyViT-5M image encoder of MobileSAM, with modality controllers in its attention blocks.

Paper-notes §2. Key names match MobileSAM's ``image_encoder.*`` so its weights load by name. The input
size is read from the tensor: windows, padding and grids are derived per call, never fixed at build time.
Feature maps between blocks are (B, H, W, C) tensors; convolutions see them as (B, C, H, W) views.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from espmedsam.config import STEMS, ControllerConfig, EncoderConfig
from espmedsam.models.common import Conv2dBN, LayerNorm2d, NormMLP
from espmedsam.models.controller import ControllerBank, ControllerRoute
from espmedsam.models.graph_layout import channels_first, channels_last, in_graph_layout


class PatchEmbed(nn.Module):
    """Two Conv+BN layers: (B, 3, S, S) -> (B, C, S/s, S/s), s = 4 (strided stem), 2 (patch2) or 1
    (pointwise)."""

    def __init__(self, in_chans: int, embed_dim: int, stem: str = "strided") -> None:
        super().__init__()
        first, second = STEMS[stem]
        self.seq = nn.Sequential(
            Conv2dBN(in_chans, embed_dim // 2, *first),
            nn.GELU(),
            Conv2dBN(embed_dim // 2, embed_dim, *second),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block; the activation comes after the residual add, as in TinyViT."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.conv1 = Conv2dBN(dim, hidden, 1)
        self.conv2 = Conv2dBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.conv3 = Conv2dBN(hidden, dim, 1, bn_weight_init=0.0)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        y = self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))
        return self.act(x + y)


class PatchMerging(nn.Module):
    """1x1 conv, depthwise 3x3 conv with ``stride``, 1x1 conv: (B, C, H, W) -> (B, H/s, W/s, C_out)."""

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = Conv2dBN(dim, out_dim, 1)
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim, 1)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channels_last(self.conv3(self.act(self.conv2(self.act(self.conv1(x))))))


class WindowAttention(nn.Module):
    """Multi-head attention inside one window, TinyViT's relative-position bias, optional prompt tokens.

    The qkv channels are head-major (head i owns [3d·i, 3d·(i+1)) as q, k, v), as in TinyViT.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # one bias per head and |Δrow|·w + |Δcol| offset inside a window
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window_size * window_size))
        self._bias_index: dict[tuple[int, int], torch.Tensor] = {}

    def relative_bias(self, wh: int, ww: int) -> torch.Tensor:
        """(h, N, N) bias for a wh x ww window (wh, ww <= window_size), N = wh·ww."""
        key = (wh, ww)
        if key not in self._bias_index:
            # a normal tensor even when first built under inference_mode, so training can use it later
            with torch.inference_mode(False):
                rows = torch.arange(wh).repeat_interleave(ww)
                cols = torch.arange(ww).repeat(wh)
                index = (rows[:, None] - rows[None]).abs() * self.window_size
                index = index + (cols[:, None] - cols[None]).abs()
            self._bias_index[key] = index
        index = self._bias_index[key].to(self.attention_biases.device)
        return self.attention_biases[:, index]

    def forward(
        self,
        x: torch.Tensor,
        window: tuple[int, int],
        prompts: tuple[torch.Tensor, torch.Tensor] | None = None,
        windows_per_image: int = 1,
    ) -> torch.Tensor:
        """Attention over windows.

        Args:
            x: (B·nW, N, C) window tokens, N = wh·ww.
            window: (wh, ww).
            prompts: per-image prompt tokens (B or 1, h, T, d) and logit biases (B or 1, 1, 1, T), or None.
            windows_per_image: nW.
        Returns:
            (B·nW, N, C).
        """
        if in_graph_layout():
            return self._graph_forward(x, window, prompts, windows_per_image)
        bw, n, c = x.shape
        qkv = self.qkv(self.norm(x)).view(bw, n, self.num_heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.head_dim, dim=-1)
        bias = self.relative_bias(*window).unsqueeze(0).to(q.dtype)
        if prompts is not None:
            k, v, bias = _append_prompts(k, v, bias, prompts, windows_per_image)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))

    def _graph_forward(
        self,
        x: torch.Tensor,
        window: tuple[int, int],
        prompts: tuple[torch.Tensor, torch.Tensor] | None,
        windows_per_image: int,
    ) -> torch.Tensor:
        """``forward`` for an exported graph (``graph_layout``): the same attention written as the
        multi-head pattern OpenVINO fuses into one kernel, head transposes and bias adds included:
        ``softmax(q·kᵀ + bias [+ prompt bias])·v`` with explicit matmuls."""
        bw, n, c = x.shape
        q, k, v = self._projections(x)
        bias = self.relative_bias(*window).unsqueeze(0).to(q.dtype)  # (1, h, N, N)
        prompt_bias = None
        if prompts is not None:
            k, v, bias, prompt_bias = _append_prompts_graph(k, v, bias, prompts, windows_per_image)
        q = (q * self.head_dim**-0.5).permute(0, 2, 1, 3)
        scores = q @ k.permute(0, 2, 1, 3).transpose(-1, -2) + bias
        if prompt_bias is not None:
            scores = scores + prompt_bias
        out = (scores.softmax(dim=-1) @ v.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)
        return self.proj(out.reshape(bw, n, c))

    def _projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B·nW, N, C) -> q, k, v as (B·nW, N, h, d), each from its own matmul: a graph compiler runs the
        split of one qkv tensor with a slow generic kernel."""
        bw, n, c = x.shape
        h, d = self.num_heads, self.head_dim
        weight = self.qkv.weight.view(h, 3, d, c)  # head-major: head i owns rows [3d·i, 3d·(i+1)) as q, k, v
        bias = self.qkv.bias.view(h, 3, d)
        normed = self.norm(x)
        q, k, v = (
            F.linear(normed, weight[:, i].reshape(h * d, c), bias[:, i].reshape(h * d)).view(bw, n, h, d)
            for i in range(3)
        )
        return q, k, v


def _append_prompts_graph(
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    prompts: tuple[torch.Tensor, torch.Tensor],
    windows_per_image: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_append_prompts`` for (B·nW, N, h, d) keys and values: the window bias (1, h, N, N) padded with
    the prompt columns' zeros, and the prompt bias returned apart as (B·nW or 1, 1, 1, N + T), to be added
    on its own (one (B·nW, h, N, N + T) bias would be written out in full at every forward)."""
    tokens, prompt_bias = prompts  # (B or 1, h, T, d), (B or 1, 1, 1, T)
    bw, n, h, d = k.shape
    t = tokens.shape[2]
    tokens = tokens.transpose(1, 2).to(k.dtype)
    if tokens.shape[0] != 1:  # one prompt per image, repeated over that image's windows
        tokens = tokens.repeat_interleave(windows_per_image, dim=0)
        prompt_bias = prompt_bias.repeat_interleave(windows_per_image, dim=0)
    tokens = tokens.expand(bw, t, h, d)
    keys, values = torch.cat([k, tokens], dim=1), torch.cat([v, tokens], dim=1)
    return keys, values, F.pad(bias, (0, t)), F.pad(prompt_bias.to(bias.dtype), (n, 0))


def _append_prompts(
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    prompts: tuple[torch.Tensor, torch.Tensor],
    windows_per_image: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Append the same prompt tokens to keys and values, and their bias column to the attention bias."""
    tokens, prompt_bias = prompts
    bw, h, n, d = k.shape
    t = tokens.shape[2]
    if tokens.shape[0] == 1:
        tokens = tokens.to(k.dtype).expand(bw, h, t, d)
        bias = torch.cat([bias, prompt_bias.to(bias.dtype).expand(1, h, n, t)], dim=-1)
    else:  # one prompt per image, repeated over that image's windows
        tokens = tokens.to(k.dtype).repeat_interleave(windows_per_image, dim=0)
        prompt_bias = prompt_bias.to(bias.dtype).repeat_interleave(windows_per_image, dim=0)
        bias = torch.cat([bias.expand(bw, h, n, n), prompt_bias.expand(bw, h, n, t)], dim=-1)
    return torch.cat([k, tokens], dim=2), torch.cat([v, tokens], dim=2), bias


class TinyViTBlock(nn.Module):
    """Windowed attention, depthwise local conv, MLP; plus each image's modality controller."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        *,
        mlp_hidden: int | None = None,
        num_controllers: int = 6,
        controller: ControllerConfig = ControllerConfig(),
        balanced_windows: bool = True,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.balanced_windows = balanced_windows
        self.attn = WindowAttention(dim, num_heads, window_size)
        self.local_conv = Conv2dBN(dim, dim, 3, 1, 1, groups=dim)
        self.mlp = NormMLP(dim, mlp_hidden or 4 * dim)
        self.controllers = ControllerBank(
            dim,
            num_heads,
            num_controllers,
            num_prompt_tokens=controller.num_prompt_tokens,
            adapter_ratio=controller.adapter_ratio,
        )

    def window_shape(self, size: int) -> int:
        """Window side along an axis of ``size`` tokens.

        Balanced windows split the axis into ceil(size / w) equal windows (less padding at small inputs);
        otherwise every window is w, as in TinyViT and the official code.
        """
        if not self.balanced_windows:
            return self.window_size
        return math.ceil(size / math.ceil(size / self.window_size))

    def forward(self, x: torch.Tensor, route: ControllerRoute | None) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C); ``route`` None (or a block without controllers) runs the shared
        block alone."""
        if not len(self.controllers):
            route = None
        b, h, w, c = x.shape
        wh, ww = self.window_shape(h), self.window_shape(w)
        pad_h, pad_w = (wh - h % wh) % wh, (ww - w % ww) % ww
        # zero padding is not masked: padded tokens act as keys/values, as in TinyViT and MobileSAM
        padded = F.pad(x, (0, 0, 0, pad_w, 0, pad_h)) if pad_h or pad_w else x
        nh, nw = (h + pad_h) // wh, (w + pad_w) // ww
        # a window's rows of ww·C values move as one piece: a 4-D transpose, which a graph compiler runs
        # much faster than the 6-D one of (B, nh, wh, nw, ww, C)
        windows = padded.reshape(b * nh, wh, nw, ww * c).transpose(1, 2).reshape(b * nh * nw, wh * ww, c)
        prompts = self.controllers.prompts(route) if route is not None else None
        out = self.attn(windows, (wh, ww), prompts, nh * nw)
        out = out.reshape(b * nh, nw, wh, ww * c).transpose(1, 2).reshape(b, h + pad_h, w + pad_w, c)
        if (pad_h or pad_w) and in_graph_layout():
            x = self._local_conv_padded(padded + out, h, w)
        else:
            x = x + out[:, :h, :w]
            x = channels_last(self.local_conv(channels_first(x)))
        if route is None:
            return x + self.mlp(x)
        return x + self.mlp(x) + self.controllers.adapt(x, route)

    def _local_conv_padded(self, summed: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """The local conv of the (B, H', W', C) padded sum, its padding zeroed first, cut to (B, h, w, C)
        after: the same values as cutting first (the zeros stand in for the conv's own zero padding).
        OpenVINO folds the layout change before a conv into the conv's input unless a cut comes between
        them; there it runs a slow generic transpose (graph layout only, see ``graph_layout``)."""
        rows = torch.arange(summed.shape[1], device=summed.device) < h
        columns = torch.arange(summed.shape[2], device=summed.device) < w
        inside = (rows[:, None] & columns[None, :])[None, :, :, None].to(summed.dtype)
        conv = self.local_conv(channels_first(summed * inside))
        return channels_last(conv)[:, :h, :w]


class ConvLayer(nn.Module):
    """First stage: MBConv blocks on (B, C, H, W), then patch merging to (B, H/2, W/2, C_out)."""

    def __init__(self, dim: int, out_dim: int, hidden: list[int], stride: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, width) for width in hidden)
        self.downsample = PatchMerging(dim, out_dim, stride)

    def forward(self, x: torch.Tensor, route: ControllerRoute | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x)


class BasicLayer(nn.Module):
    """An attention stage: TinyViT blocks on (B, H, W, C), then optional patch merging."""

    def __init__(self, blocks: list[TinyViTBlock], downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor, route: ControllerRoute | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, route)
        if self.downsample is not None:
            x = self.downsample(channels_first(x))
        return x


class TinyViT(nn.Module):
    """Shared TinyViT encoder with a bank of modality controllers in every attention block.

    (B, 3, S, S) -> (B, out_chans, S/s, S/s), s = ``config.output_stride`` (16 for MobileSAM's strided
    stem, 4 for LiteMedSAM's pointwise one).
    """

    def __init__(
        self,
        config: EncoderConfig = EncoderConfig(),
        *,
        num_controllers: int = 6,
        controller: ControllerConfig = ControllerConfig(),
    ) -> None:
        super().__init__()
        dims = config.embed_dims
        self.frozen_batchnorm = False  # True: batch norms keep their running statistics in train mode
        self.patch_embed = PatchEmbed(3, dims[0], config.stem)
        layers: list[nn.Module] = [
            ConvLayer(dims[0], dims[1], config.mbconv_hidden(), config.merge_strides[0])
        ]
        for i in range(1, len(dims)):
            blocks = [
                TinyViTBlock(
                    dims[i],
                    config.num_heads[i],
                    config.window_sizes[i],
                    mlp_hidden=width,
                    # stages before ``first_stage`` carry no controllers (a frozen, cached prefix)
                    num_controllers=num_controllers if i >= controller.first_stage else 0,
                    controller=controller,
                    balanced_windows=config.balanced_windows,
                )
                for width in config.mlp_hidden(i)
            ]
            last = i == len(dims) - 1
            merge = None if last else PatchMerging(dims[i], dims[i + 1], config.merge_strides[i])
            layers.append(BasicLayer(blocks, merge))
        self.layers = nn.ModuleList(layers)
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], config.out_chans, 1, bias=False),
            LayerNorm2d(config.out_chans),
            nn.Conv2d(config.out_chans, config.out_chans, 3, padding=1, bias=False),
            LayerNorm2d(config.out_chans),
        )

    def forward(self, images: torch.Tensor, route: ControllerRoute | None = None) -> torch.Tensor:
        """Image embedding.

        Args:
            images: (B, 3, S, S) normalised images.
            route: the controller of each image, or None for the shared encoder alone.
        Returns:
            (B, out_chans, S/s, S/s) embedding, s = ``config.output_stride``.
        """
        return self.suffix(self.prefix(images, 0, route), 0, route)

    def prefix(self, images: torch.Tensor, depth: int, route: ControllerRoute | None = None) -> torch.Tensor:
        """The stem and the first ``depth`` stages: (B, 3, S, S) -> their output features.

        ``depth`` 0 returns the stem's (B, C0, S', S') map; otherwise the (B, h, w, C) tokens that stage
        ``depth`` takes (``train.frozen`` caches them when that prefix is frozen).
        """
        # channels-last convolutions are several times faster on CPU (oneDNN), and match (B, H, W, C) tokens
        x = self.patch_embed(images.contiguous(memory_format=torch.channels_last))
        for layer in self.layers[:depth]:
            x = layer(x, route)
        return x

    def suffix(
        self, features: torch.Tensor, depth: int, route: ControllerRoute | None = None
    ) -> torch.Tensor:
        """Stages ``depth`` onwards and the neck on the output of ``prefix(images, depth)`` -> the
        (B, out_chans, S/s, S/s) embedding."""
        x = features
        for layer in self.layers[depth:]:
            x = layer(x, route)
        return self.neck(channels_first(x))

    def train(self, mode: bool = True) -> TinyViT:
        """As ``nn.Module.train``; with ``frozen_batchnorm`` the batch norms stay in eval mode (a partly
        trained encoder on small mixed-modality batches keeps its pretrained statistics)."""
        super().train(mode)
        if self.frozen_batchnorm:
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        return self
