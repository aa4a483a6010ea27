"""Small blocks shared by several modules: channel LayerNorm, MLPs and Conv+BatchNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from espmedsam.models.graph_layout import in_graph_layout


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map, eps 1e-6 as in SAM."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        if in_graph_layout():
            # reductions over the channels, which OpenVINO fuses into one normalisation, where the
            # permutations below cost it two generic transposes
            centred = x - x.mean(1, keepdim=True)
            y = centred / torch.sqrt(centred.pow(2).mean(1, keepdim=True) + self.eps)
            return y * self.weight[:, None, None] + self.bias[:, None, None]
        # B C H W -> B H W C so that layer_norm normalises the channels in one fused kernel
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class MLPBlock(nn.Module):
    """Linear -> activation -> Linear, SAM's transformer MLP (keys ``lin1``, ``lin2``)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., C)."""
        return self.lin2(self.act(self.lin1(x)))


class NormMLP(nn.Module):
    """LayerNorm -> Linear(C, hC) -> GELU -> Linear(hC, C): TinyViT's block MLP and the controller adapter."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., C)."""
        return self.fc2(self.act(self.fc1(self.norm(x))))


class HyperMLP(nn.Module):
    """SAM's hypernetwork / head MLP: ``num_layers`` Linears (key ``layers.i``) with ReLU between."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int = 3) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., input_dim) -> (..., output_dim)."""
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class Conv2dBN(nn.Sequential):
    """Bias-free Conv2d followed by BatchNorm2d (keys ``c``, ``bn``), as in TinyViT.

    In eval mode the BatchNorm is folded into the convolution on the fly: one kernel instead of two
    passes over the activation, the same result up to float rounding.
    """

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.add_module(
            "c", nn.Conv2d(in_chans, out_chans, kernel_size, stride, padding, groups=groups, bias=False)
        )
        self.add_module("bn", nn.BatchNorm2d(out_chans))
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, H / stride, W / stride)."""
        if self.training:
            return self.bn(self.c(x))
        scale = self.bn.weight * torch.rsqrt(self.bn.running_var + self.bn.eps)
        weight = self.c.weight * scale.reshape(-1, 1, 1, 1)
        bias = self.bn.bias - self.bn.running_mean * scale
        conv = self.c
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def output_upscaling(embed_dim: int, mid: int, out: int) -> nn.Sequential:
    """SAM's mask-decoder upscaling: two stride-2 transposed convolutions, (B, C, h, w) -> (B, out, 4h, 4w)
    (keys ``0``, ``1`` and ``3`` as in SAM's ``output_upscaling``)."""
    return nn.Sequential(
        nn.ConvTranspose2d(embed_dim, mid, kernel_size=2, stride=2),
        LayerNorm2d(mid),
        nn.GELU(),
        nn.ConvTranspose2d(mid, out, kernel_size=2, stride=2),
        nn.GELU(),
    )
