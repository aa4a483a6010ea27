"""Modality controllers: the per-modality half of "semi-parameter sharing" (paper-notes §2).

Inside every TinyViT attention block, each modality owns a ``ModalityController``: key/value prompt
tokens appended to that block's keys and values, a learnable scalar bias on their attention logits, and
a parallel adapter MLP added beside the block MLP. A modality's whole controller is the set of its
``ModalityController``s across the blocks. ``ControllerBank`` holds one block's controllers and routes each
image of a batch through its own, so a batch may mix modalities.

Eager routing groups the batch by modality with Python ints, which an exported graph would bake in. While
exporting (or inside ``gathered_routing()``) a route has no groups: each image picks its controller's
parameters, stacked (K, ...), by its modality index, so the graph serves any mix of modalities.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from espmedsam.models.common import NormMLP

_GATHERED = [False]  # a one-element list: the flag gathered_routing() sets and restores


def trace_safe_routing() -> bool:
    """Whether modality routing must be data-independent: while exporting or tracing the model, or
    inside ``gathered_routing()``."""
    return (
        _GATHERED[0]
        or torch.onnx.is_in_onnx_export()
        or torch.compiler.is_exporting()
        or torch.jit.is_tracing()
    )


@contextmanager
def gathered_routing() -> Iterator[None]:
    """Route every image by gathering its modality's parameters, as an exported graph does."""
    previous, _GATHERED[0] = _GATHERED[0], True
    try:
        yield
    finally:
        _GATHERED[0] = previous


def gathered_linear(x: torch.Tensor, layers: Sequence[nn.Linear], index: torch.Tensor) -> torch.Tensor:
    """(B, N, C_in) -> (B, N, C_out), image i through its own Linear ``layers[index[i]]``."""
    weight = torch.stack([layer.weight for layer in layers]).index_select(0, index)  # (B, C_out, C_in)
    bias = torch.stack([layer.bias for layer in layers]).index_select(0, index)  # (B, C_out)
    return torch.baddbmm(bias.unsqueeze(1).to(x.dtype), x, weight.transpose(1, 2).to(x.dtype))


@dataclass(frozen=True)
class ControllerRoute:
    """Which controller each image of a batch goes through, computed once per forward pass."""

    index: torch.Tensor  # (B,) int64 controller index per image
    groups: tuple[tuple[int, torch.Tensor], ...]  # (controller, positions of its images in the batch)

    @classmethod
    def from_index(cls, index: torch.Tensor) -> ControllerRoute:
        index = index.reshape(-1).to(torch.int64)
        groups = tuple((int(k), (index == k).nonzero().reshape(-1)) for k in torch.unique(index))
        return cls(index=index, groups=groups)

    @classmethod
    def gathered(cls, index: torch.Tensor) -> ControllerRoute:
        """A route without groups: each image gathers its controller's parameters (trace-safe)."""
        return cls(index=index.reshape(-1).to(torch.int64), groups=())

    @property
    def single(self) -> int | None:
        """The controller of the whole batch when all images share one, else None."""
        return self.groups[0][0] if len(self.groups) == 1 else None


class ModalityController(nn.Module):
    """One modality's additions to one attention block with ``num_heads`` heads of ``dim // num_heads``."""

    def __init__(self, dim: int, num_heads: int, *, num_prompt_tokens: int = 1, adapter_ratio: float = 4.0):
        super().__init__()
        self.prompt_tokens = nn.Parameter(torch.empty(num_heads, num_prompt_tokens, dim // num_heads))
        self.prompt_bias = nn.Parameter(torch.zeros(1))
        self.adapter = NormMLP(dim, int(dim * adapter_ratio))
        nn.init.trunc_normal_(self.prompt_tokens, std=0.02)
        # a zero last layer makes a fresh controller start as the identity of the shared block
        nn.init.zeros_(self.adapter.fc2.weight)
        nn.init.zeros_(self.adapter.fc2.bias)


class ControllerBank(nn.ModuleList):
    """The controllers of one block, one per modality (or one shared by all in the official layout)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_controllers: int,
        *,
        num_prompt_tokens: int = 1,
        adapter_ratio: float = 4.0,
    ) -> None:
        super().__init__(
            ModalityController(
                dim, num_heads, num_prompt_tokens=num_prompt_tokens, adapter_ratio=adapter_ratio
            )
            for _ in range(num_controllers)
        )

    def prompts(self, route: ControllerRoute) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt tokens (B or 1, h, T, d) and their logit biases (B or 1, 1, 1, T) for the batch."""
        if route.single is not None:
            controller = self[route.single]
            tokens = controller.prompt_tokens.unsqueeze(0)
            bias = controller.prompt_bias.expand(tokens.shape[2])
            return tokens, bias.reshape(1, 1, 1, -1)
        if not route.groups:
            tokens = torch.stack([c.prompt_tokens for c in self]).index_select(0, route.index)
            bias = torch.stack([c.prompt_bias for c in self]).index_select(0, route.index)  # (B, 1)
            return tokens, bias.expand(-1, tokens.shape[2]).reshape(tokens.shape[0], 1, 1, -1)
        picked = [self[k] for k in route.index.tolist()]
        tokens = torch.stack([c.prompt_tokens for c in picked])
        bias = torch.stack([c.prompt_bias.expand(tokens.shape[2]) for c in picked])
        return tokens, bias.reshape(len(picked), 1, 1, -1)

    def adapt(self, x: torch.Tensor, route: ControllerRoute) -> torch.Tensor:
        """Adapter output for (B, ..., C) tokens, each image through its own controller's adapter."""
        if route.single is not None:
            return self[route.single].adapter(x)
        if not route.groups:
            return self._adapt_gathered(x, route.index)
        parts = [(positions, self[k].adapter(x.index_select(0, positions))) for k, positions in route.groups]
        out = parts[0][1].new_zeros((x.shape[0], *parts[0][1].shape[1:]))
        for positions, part in parts:
            out = out.index_copy(0, positions, part)
        return out

    def _adapt_gathered(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """LayerNorm -> fc1 -> GELU -> fc2 of (B, ..., C) tokens, image i with controller ``index[i]``'s
        weights, as batched matmuls."""
        adapters = [c.adapter for c in self]
        first = adapters[0]
        tokens = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, N, C)
        gamma = torch.stack([a.norm.weight for a in adapters]).index_select(0, index).unsqueeze(1)
        beta = torch.stack([a.norm.bias for a in adapters]).index_select(0, index).unsqueeze(1)
        normed = F.layer_norm(tokens, first.norm.normalized_shape, eps=first.norm.eps) * gamma + beta
        hidden = first.act(gathered_linear(normed, [a.fc1 for a in adapters], index))
        return gathered_linear(hidden, [a.fc2 for a in adapters], index).reshape(x.shape)
