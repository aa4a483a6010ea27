"""An independent, functional re-implementation of the official ESP-MedSAM forward pass.

Written from the prose description in ``shared/reference/official_forward.md`` (github.com/xq141839/ESP-MedSAM
at commit 9c3ade6), operating directly on a raw state dict with the official key names. It deliberately
imports nothing from ``espmedsam``: it is the yardstick the package's ``official`` layout is checked against.

Every quirk of the official code is kept (section numbers refer to official_forward.md):

- normalisation ``(x - mean) / mean`` (the pixel_std bug, §0);
- per-head (head-major) qkv split, one prompt token appended to k and v, relative-position bias indexed by
  ``|drow| * w + |dcol|``, scalar ``med_attention_biases`` on the prompt column (§1.2);
- fixed windows (7, 14, 7), zero padding bottom/right, padded tokens *not* masked (§1.1);
- ``x + mlp(x) + med_dah(x)`` with both MLPs reading the same x (§1.1);
- MBConv with GELU after the residual add, PatchMerging with strides 2, 2, 1 (§1);
- patch decoder, ``sigmoid >= 0.5`` threshold, nearest x2, dense prompter (§2);
- one image at a time through SAM's two-way transformer with 7 query tokens that are also their own PE,
  layer 0 without self-attention residual, one hypernetwork shared by tokens 0..5, channel ``mcls`` (§3).

The only departure from the official code is that nothing is hard-coded to 1024: every grid is read from
the tensors, so the same function runs at 256 or 512 (the window sizes and the padding rule stay fixed).
All float parameters are cast to the input's dtype, so the reference can also run in float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

PIXEL_MEAN = (123.675, 116.28, 103.53)

# TinyViT-5M as used by MobileSAM / ESP-MedSAM.
EMBED_DIMS = (64, 128, 160, 320)
DEPTHS = (2, 2, 6, 2)
NUM_HEADS = (2, 4, 5, 10)  # layers[0] is a ConvLayer; its entry is unused
WINDOW_SIZES = (7, 7, 14, 7)  # layers[0] unused
MBCONV_EXPAND = 4
MLP_RATIO = 4
NUM_MASKS = 6  # tokens 0..5 are decoded; token 6 only takes part in attention

# SAM two-way transformer.
DEC_DEPTH = 2
DEC_HEADS = 8
DEC_DOWNSAMPLE = 2  # cross-attention internal dim = 256 / 2

BN_EPS = 1e-5
LN_EPS = 1e-5
LN2D_EPS = 1e-6


def official_normalise(rgb_0_255: Tensor) -> Tensor:
    """(B, 3, H, W) or (3, H, W) RGB in 0..255 (any dtype) -> float32 ``x_c / mean_c - 1``.

    The official code computes ``(x - pixel_mean) / pixel_std`` with ``pixel_std`` built from the *mean*
    argument, so the effective transform is ``(x - mean) / mean``. No division by 255 happens (torchvision
    ``ToTensor`` leaves float32 arrays unscaled).
    """
    x = rgb_0_255
    if not x.is_floating_point():
        x = x.to(torch.float32)
    mean = torch.tensor(PIXEL_MEAN, dtype=x.dtype, device=x.device)
    shape = (3, 1, 1) if x.dim() == 3 else (1, 3, 1, 1)
    if x.shape[-3] != 3:
        raise ValueError(f"expected 3 channels, got shape {tuple(x.shape)}")
    mean = mean.view(shape)
    return (x - mean) / mean


# ---------------------------------------------------------------------------------------------------------
# small building blocks


class _Params:
    """State-dict accessor that casts float tensors to the working dtype/device."""

    def __init__(self, state_dict: dict[str, Tensor], dtype: torch.dtype, device: torch.device) -> None:
        self.sd = state_dict
        self.dtype = dtype
        self.device = device

    def __call__(self, key: str) -> Tensor:
        t = self.sd[key]
        if t.is_floating_point():
            t = t.to(device=self.device, dtype=self.dtype)
        return t


def _gelu(x: Tensor) -> Tensor:
    return F.gelu(x)  # exact (erf) GELU


def _conv_bn(
    p: _Params, prefix: str, x: Tensor, stride: int = 1, padding: int = 0, groups: int = 1
) -> Tensor:
    """Conv_BN: bias-free Conv2d (``.c``) then eval-mode BatchNorm2d (``.bn``)."""
    x = F.conv2d(x, p(f"{prefix}.c.weight"), None, stride=stride, padding=padding, groups=groups)
    return F.batch_norm(
        x,
        p(f"{prefix}.bn.running_mean"),
        p(f"{prefix}.bn.running_var"),
        p(f"{prefix}.bn.weight"),
        p(f"{prefix}.bn.bias"),
        training=False,
        momentum=0.0,
        eps=BN_EPS,
    )


def _ln(p: _Params, prefix: str, x: Tensor) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), p(f"{prefix}.weight"), p(f"{prefix}.bias"), eps=LN_EPS)


def _ln2d(p: _Params, prefix: str, x: Tensor) -> Tensor:
    """Channel LayerNorm on NCHW, written out as in SAM's LayerNorm2d (biased variance, eps 1e-6)."""
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    x = (x - u) / torch.sqrt(s + LN2D_EPS)
    return p(f"{prefix}.weight")[:, None, None] * x + p(f"{prefix}.bias")[:, None, None]


def _linear(p: _Params, prefix: str, x: Tensor) -> Tensor:
    return F.linear(x, p(f"{prefix}.weight"), p(f"{prefix}.bias"))


# ---------------------------------------------------------------------------------------------------------
# image encoder (§1)


def _mbconv(p: _Params, prefix: str, x: Tensor) -> Tensor:
    shortcut = x
    hidden = x.shape[1] * MBCONV_EXPAND
    x = _gelu(_conv_bn(p, f"{prefix}.conv1", x))
    x = _gelu(_conv_bn(p, f"{prefix}.conv2", x, padding=1, groups=hidden))
    x = _conv_bn(p, f"{prefix}.conv3", x)
    return _gelu(x + shortcut)  # activation after the residual add


def _patch_merging(p: _Params, prefix: str, x: Tensor, out_dim: int) -> tuple[Tensor, Tensor]:
    """NCHW -> (NCHW map, tokens (B, H'*W', out_dim)); depthwise stride 1 when out_dim in {320, 448, 576}."""
    stride = 1 if out_dim in (320, 448, 576) else 2
    x = _gelu(_conv_bn(p, f"{prefix}.conv1", x))
    x = _gelu(_conv_bn(p, f"{prefix}.conv2", x, stride=stride, padding=1, groups=out_dim))
    x = _conv_bn(p, f"{prefix}.conv3", x)
    return x, x.flatten(2).transpose(1, 2)


def _attention_bias_matrix(biases: Tensor, w: int) -> Tensor:
    """(h, w*w) attention_biases -> (h, N, N) with idx(p, q) = |drow|*w + |dcol| over a w x w window."""
    rows = torch.arange(w).repeat_interleave(w)  # row of each row-major position
    cols = torch.arange(w).repeat(w)
    idx = (rows[:, None] - rows[None, :]).abs() * w + (cols[:, None] - cols[None, :]).abs()
    return biases[:, idx.to(biases.device)]


def _window_attention(p: _Params, prefix: str, x: Tensor, heads: int, w: int) -> Tensor:
    """TinyViT attention with the ESP-MedSAM prompt token, on (B', N, C) windows, N = w*w."""
    bw, n, c = x.shape
    d = c // heads
    scale = d**-0.5
    x = _ln(p, f"{prefix}.norm", x)
    qkv = _linear(p, f"{prefix}.qkv", x)  # (B', N, 3C), head-major: head i owns [3d*i, 3d*(i+1))
    qkv = qkv.view(bw, n, heads, 3 * d)
    q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
    q = q.permute(0, 2, 1, 3)  # (B', h, N, d)
    k = k.permute(0, 2, 1, 3)
    v = v.permute(0, 2, 1, 3)

    prompt = p(f"{prefix}.deep_QKV_embeddings_med")  # (h, 1, d), same tensor for k and v
    prompt = prompt.unsqueeze(0).expand(bw, heads, 1, d)
    k = torch.cat([k, prompt], dim=2)  # (B', h, N+1, d)
    v = torch.cat([v, prompt], dim=2)

    attn = (q @ k.transpose(-2, -1)) * scale  # (B', h, N, N+1)
    ab = _attention_bias_matrix(p(f"{prefix}.attention_biases"), w)  # (h, N, N)
    med = p(f"{prefix}.med_attention_biases")  # (1,)
    bias = torch.cat([ab, med.view(1, 1, 1).expand(heads, n, 1)], dim=2)  # (h, N, N+1)
    attn = attn + bias.unsqueeze(0)
    attn = torch.softmax(attn, dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(bw, n, c)
    return _linear(p, f"{prefix}.proj", out)


def _mlp(p: _Params, prefix: str, x: Tensor) -> Tensor:
    x = _ln(p, f"{prefix}.norm", x)
    x = _gelu(_linear(p, f"{prefix}.fc1", x))
    return _linear(p, f"{prefix}.fc2", x)


def _tinyvit_block(p: _Params, prefix: str, x: Tensor, hw: tuple[int, int], heads: int, w: int) -> Tensor:
    h_, w_ = hw
    b, length, c = x.shape
    assert length == h_ * w_, "input feature has wrong size"
    res = x
    if h_ == w and w_ == w:
        x = _window_attention(p, f"{prefix}.attn", x, heads, w)
    else:
        x = x.view(b, h_, w_, c)
        pad_b = (w - h_ % w) % w
        pad_r = (w - w_ % w) % w
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))  # zeros at the bottom and right, not masked
        ph, pw = h_ + pad_b, w_ + pad_r
        nh, nw = ph // w, pw // w
        x = x.view(b, nh, w, nw, w, c).transpose(2, 3).reshape(b * nh * nw, w * w, c)
        x = _window_attention(p, f"{prefix}.attn", x, heads, w)
        x = x.view(b, nh, nw, w, w, c).transpose(2, 3).reshape(b, ph, pw, c)
        x = x[:, :h_, :w_].contiguous().view(b, length, c)
    x = res + x

    x = x.transpose(1, 2).reshape(b, c, h_, w_)
    x = _conv_bn(p, f"{prefix}.local_conv", x, padding=1, groups=c)
    x = x.reshape(b, c, length).transpose(1, 2)

    return x + _mlp(p, f"{prefix}.mlp", x) + _mlp(p, f"{prefix}.med_dah", x)


def _image_encoder(p: _Params, x: Tensor) -> Tensor:
    pre = "SemiTViT"
    x = _gelu(_conv_bn(p, f"{pre}.patch_embed.seq.0", x, stride=2, padding=1))
    x = _conv_bn(p, f"{pre}.patch_embed.seq.2", x, stride=2, padding=1)  # (B, 64, S/4, S/4)

    # layers[0]: ConvLayer of MBConvs, then PatchMerging 64 -> 128 (stride 2)
    for i in range(DEPTHS[0]):
        x = _mbconv(p, f"{pre}.layers.0.blocks.{i}", x)
    fmap, tokens = _patch_merging(p, f"{pre}.layers.0.downsample", x, EMBED_DIMS[1])
    hw = tuple(fmap.shape[-2:])

    for li in range(1, 4):
        for bi in range(DEPTHS[li]):
            prefix = f"{pre}.layers.{li}.blocks.{bi}"
            tokens = _tinyvit_block(p, prefix, tokens, hw, NUM_HEADS[li], WINDOW_SIZES[li])
        if li < 3:
            b, length, c = tokens.shape
            fmap = tokens.view(b, hw[0], hw[1], c).permute(0, 3, 1, 2)
            fmap, tokens = _patch_merging(p, f"{pre}.layers.{li}.downsample", fmap, EMBED_DIMS[li + 1])
            hw = tuple(fmap.shape[-2:])

    b, length, c = tokens.shape
    x = tokens.view(b, hw[0], hw[1], c).permute(0, 3, 1, 2)  # official: hard-coded 64 x 64
    x = F.conv2d(x, p(f"{pre}.neck.0.weight"))
    x = _ln2d(p, f"{pre}.neck.1", x)
    x = F.conv2d(x, p(f"{pre}.neck.2.weight"), padding=1)
    return _ln2d(p, f"{pre}.neck.3", x)


# ---------------------------------------------------------------------------------------------------------
# patch branch (§2)


def _patch_decoder(p: _Params, emb: Tensor) -> Tensor:
    x = F.conv2d(emb, p("patch_decoder.0.weight"), p("patch_decoder.0.bias"), stride=2)
    x = _gelu(_ln2d(p, "patch_decoder.1", x))
    return F.conv2d(x, p("patch_decoder.3.weight"), p("patch_decoder.3.bias"))


def _dense_prompter(p: _Params, prob: Tensor) -> Tensor:
    x = F.conv2d(prob, p("dense_prompter.0.weight"), p("dense_prompter.0.bias"))
    return _gelu(_ln2d(p, "dense_prompter.1", x))


# ---------------------------------------------------------------------------------------------------------
# prompt encoder PE and mask decoder (§3)


def _dense_pe(p: _Params, h: int, w: int) -> Tensor:
    """SAM's random-Fourier PE of an h x w grid -> (1, 256, h, w)."""
    g = p("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix")  # (2, 128)
    grid = torch.ones((h, w), device=g.device, dtype=g.dtype)
    y = (grid.cumsum(dim=0) - 0.5) / h
    x = (grid.cumsum(dim=1) - 0.5) / w
    coords = torch.stack([x, y], dim=-1)  # x first, then y
    coords = 2 * coords - 1
    f = 2 * math.pi * (coords @ g)
    pe = torch.cat([torch.sin(f), torch.cos(f)], dim=-1)  # (h, w, 256)
    return pe.permute(2, 0, 1).unsqueeze(0)


def _sam_attention(
    p: _Params, prefix: str, q: Tensor, k: Tensor, v: Tensor, heads: int = DEC_HEADS
) -> Tensor:
    q = _linear(p, f"{prefix}.q_proj", q)
    k = _linear(p, f"{prefix}.k_proj", k)
    v = _linear(p, f"{prefix}.v_proj", v)

    def split(t: Tensor) -> Tensor:
        b, n, c = t.shape
        return t.reshape(b, n, heads, c // heads).transpose(1, 2)

    q, k, v = split(q), split(k), split(v)
    c_per_head = q.shape[-1]
    attn = q @ k.permute(0, 1, 3, 2)
    attn = attn / math.sqrt(c_per_head)
    attn = torch.softmax(attn, dim=-1)
    out = attn @ v
    b, h, n, d = out.shape
    out = out.transpose(1, 2).reshape(b, n, h * d)
    return _linear(p, f"{prefix}.out_proj", out)


def _two_way_transformer(p: _Params, src: Tensor, pos: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    pre = "mask_decoder.transformer"
    keys = src.flatten(2).permute(0, 2, 1)  # (1, HW, 256)
    key_pe = pos.flatten(2).permute(0, 2, 1)
    queries = tokens
    query_pe = tokens  # the query embeddings are their own PE
    for li in range(DEC_DEPTH):
        lp = f"{pre}.layers.{li}"
        if li == 0:  # skip_first_layer_pe: no PE and no residual
            queries = _sam_attention(p, f"{lp}.self_attn", queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + _sam_attention(p, f"{lp}.self_attn", q, q, queries)
        queries = _ln(p, f"{lp}.norm1", queries)

        q = queries + query_pe
        k = keys + key_pe
        queries = queries + _sam_attention(p, f"{lp}.cross_attn_token_to_image", q, k, keys)
        queries = _ln(p, f"{lp}.norm2", queries)

        mlp = _linear(p, f"{lp}.mlp.lin2", torch.relu(_linear(p, f"{lp}.mlp.lin1", queries)))
        queries = _ln(p, f"{lp}.norm3", queries + mlp)

        q = queries + query_pe
        k = keys + key_pe
        keys = keys + _sam_attention(p, f"{lp}.cross_attn_image_to_token", k, q, queries)
        keys = _ln(p, f"{lp}.norm4", keys)

    q = queries + query_pe
    k = keys + key_pe
    queries = queries + _sam_attention(p, f"{pre}.final_attn_token_to_image", q, k, keys)
    queries = _ln(p, f"{pre}.norm_final_attn", queries)
    return queries, keys


def _hypernetwork(p: _Params, t: Tensor) -> Tensor:
    pre = "mask_decoder.output_hypernetworks_mlps.0.layers"
    t = torch.relu(_linear(p, f"{pre}.0", t))
    t = torch.relu(_linear(p, f"{pre}.1", t))
    return _linear(p, f"{pre}.2", t)


def _mask_decoder(p: _Params, src: Tensor, pos: Tensor, tokens: Tensor, mcls: int) -> Tensor:
    hs, keys = _two_way_transformer(p, src, pos, tokens)
    b, c, h, w = src.shape
    x = keys.transpose(1, 2).view(b, c, h, w)
    pre = "mask_decoder.output_upscaling"
    x = F.conv_transpose2d(x, p(f"{pre}.0.weight"), p(f"{pre}.0.bias"), stride=2)
    x = _gelu(_ln2d(p, f"{pre}.1", x))
    x = _gelu(F.conv_transpose2d(x, p(f"{pre}.3.weight"), p(f"{pre}.3.bias"), stride=2))
    hyper_in = torch.stack([_hypernetwork(p, hs[:, i, :]) for i in range(NUM_MASKS)], dim=1)  # (1, 6, 32)
    b, c, h, w = x.shape
    masks = (hyper_in @ x.view(b, c, h * w)).view(b, -1, h, w)  # (1, 6, 4H, 4W)
    return masks[:, mcls : mcls + 1]


# ---------------------------------------------------------------------------------------------------------
# whole model


@torch.no_grad()
def official_forward(state_dict: dict[str, Tensor], x: Tensor, mcls: int) -> tuple[Tensor, Tensor, Tensor]:
    """The official ``ESPMedSAM.forward(x, domain_seq=mcls)`` at any input size S (a multiple of 32).

    Args:
        state_dict: raw official state dict (``SemiTViT.*``, ``mask_decoder.*``, ... keys).
        x: (B, 3, S, S) already normalised (see ``official_normalise``); its dtype is the working dtype.
        mcls: decoding channel 0..5, shared by the whole batch.
    Returns:
        masks (B, 1, S, S) logits, patch_map (B, 1, S/32, S/32) logits, image_embeddings (B, 256, S/16, S/16).
    """
    if not isinstance(mcls, int) or isinstance(mcls, bool) or not 0 <= mcls < NUM_MASKS:
        raise ValueError(f"mcls must be a Python int in 0..{NUM_MASKS - 1}, got {mcls!r}")
    if x.dim() != 4 or x.shape[1] != 3 or x.shape[-1] % 32 or x.shape[-2] % 32:
        raise ValueError(f"expected (B, 3, S, S) with S a multiple of 32, got {tuple(x.shape)}")
    p = _Params(state_dict, x.dtype, x.device)

    image_embeddings = _image_encoder(p, x)

    patch_map = _patch_decoder(p, image_embeddings)
    prob = torch.sigmoid(patch_map.detach())
    prob = torch.where(prob >= 0.5, torch.ones_like(prob), torch.zeros_like(prob))
    prob = F.interpolate(prob, scale_factor=2)  # default mode 'nearest'
    patch_embeddings = _dense_prompter(p, prob)

    h, w = image_embeddings.shape[-2:]
    image_pe = _dense_pe(p, h, w)
    tokens = p("mask_query.weight").unsqueeze(0)  # (1, 7, 256); the sparse prompt is empty

    masks = []
    for b in range(x.shape[0]):
        src = image_embeddings[b : b + 1] + patch_embeddings[b : b + 1]
        low_res = _mask_decoder(p, src, image_pe, tokens, mcls)
        up = F.interpolate(low_res, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
        masks.append(up.squeeze(0))
    return torch.stack(masks, dim=0), patch_map, image_embeddings
