"""The layout an exported graph is traced in (``graph_layout``): the same values as eager PyTorch, with
the tensor layout changes written in the forms a graph compiler (OpenVINO) runs fast. Eager code never
enters it; ``checkpoints/onnx_export.py`` traces the model inside it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_GRAPH_LAYOUT = [False]


@contextlib.contextmanager
def graph_layout() -> Iterator[None]:
    """Trace the model for an exported graph: the same values (up to float rounding), laid out for a
    graph compiler rather than for eager PyTorch. Eager oneDNN takes a (B, C, H, W) view of a
    (B, H, W, C) tensor for free; a compiled graph copies it, and OpenVINO's generic 4-D transpose for
    that copy took about a quarter of a 512² forward. Here the copy is a batched matrix transpose; the
    local conv runs before the padding is cut (``tinyvit.TinyViTBlock._local_conv_padded``); the window
    attention is written as the pattern OpenVINO fuses (``tinyvit.WindowAttention._graph_forward``); and
    the channel LayerNorm is reductions over the channels (``common.LayerNorm2d``)."""
    previous, _GRAPH_LAYOUT[0] = _GRAPH_LAYOUT[0], True
    try:
        yield
    finally:
        _GRAPH_LAYOUT[0] = previous


def channels_first(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, C, H, W): a view in eager mode; under ``graph_layout`` a transpose of
    (B, H·W, C) matrices, which OpenVINO runs several times faster than the 4-D permutation."""
    if not _GRAPH_LAYOUT[0]:
        return x.permute(0, 3, 1, 2)
    b, h, w, c = x.shape
    return x.reshape(b, h * w, c).transpose(1, 2).reshape(b, c, h, w)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W, C): a view in eager mode; under ``graph_layout`` a transpose of
    (B, C, H·W) matrices. OpenVINO otherwise carries the convolution's channels-last memory layout into
    the (B, H, W, C) tensors after it and converts back and forth around every elementwise operation."""
    if not _GRAPH_LAYOUT[0]:
        return x.permute(0, 2, 3, 1)
    b, c, h, w = x.shape
    return x.reshape(b, c, h * w).transpose(1, 2).reshape(b, h, w, c)


def in_graph_layout() -> bool:
    """True while an export traces the model inside ``graph_layout``."""
    return _GRAPH_LAYOUT[0]
