"""A random state dict with exactly the official ESP-MedSAM key names, shapes and dtypes.

The manifest is ``shared/reference/espmedsam_official_state_dict.tsv`` (key, shape, dtype per line). Values
are plausible rather than trained: fan-in scaled weights so activations stay O(1), BatchNorm running
statistics and LayerNorm affine parameters near identity, and the official model's "quirk" parameters
(relative-position biases, the med prompt token and its scalar bias, the Fourier PE matrix) clearly non-zero
so that every one of them influences the output.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

MANIFEST_PATH = (
    Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "espmedsam_official_state_dict.tsv"
)

# Bias of the patch decoder's last 1x1 conv; with the weights below it puts the patch logits of a random
# normalised image on both sides of the 0.5 threshold (checked by tests/reference/test_official_parity.py).
PATCH_DECODER_BIAS = 0.4

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64, "float16": torch.float16}


def manifest_available() -> bool:
    return MANIFEST_PATH.is_file()


def read_manifest(path: Path = MANIFEST_PATH) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(key, shape, dtype) of every official state-dict entry, in file order."""
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        dims = tuple(int(d) for d in shape.strip("[]").split(",") if d.strip())
        rows.append((key, dims, _DTYPES[dtype.strip()]))
    return rows


def _value(key: str, shape: tuple[int, ...], g: torch.Generator) -> Tensor:
    def randn(*s: int) -> Tensor:
        return torch.randn(s, generator=g)

    def rand(*s: int) -> Tensor:
        return torch.rand(s, generator=g)

    leaf = key.rsplit(".", 1)[-1]

    # quirk parameters: make them matter
    if leaf == "attention_biases":
        return randn(*shape)
    if leaf == "med_attention_biases":
        # |b| in [0.5, 1.5] with a random sign: clearly non-zero
        return (0.5 + rand(*shape)) * torch.where(rand(*shape) < 0.5, -1.0, 1.0)
    if leaf == "deep_QKV_embeddings_med":
        return randn(*shape)
    if leaf == "positional_encoding_gaussian_matrix":
        return randn(*shape)
    if key == "mask_query.weight" or ".point_embeddings." in key or leaf.endswith("_embed"):
        return randn(*shape)
    if key == "patch_decoder.3.bias":
        return torch.full(shape, PATCH_DECODER_BIAS)

    # BatchNorm (Conv_BN's .bn)
    if ".bn." in key:
        if leaf == "weight":
            return 1.0 + 0.1 * randn(*shape)
        if leaf == "bias":
            return 0.1 * randn(*shape)
        if leaf == "running_mean":
            return 0.1 * randn(*shape)
        if leaf == "running_var":
            return 0.5 + rand(*shape)

    # 1-D weights elsewhere are LayerNorm / LayerNorm2d affine weights
    if leaf == "weight" and len(shape) == 1:
        return 1.0 + 0.1 * randn(*shape)
    if leaf == "bias":
        return 0.05 * randn(*shape)

    if leaf == "weight":
        if ".output_upscaling." in key and len(shape) == 4:
            fan_in = shape[0]  # ConvTranspose2d (in, out, k, k) with stride k: one tap per output pixel
        else:
            fan_in = math.prod(shape[1:])  # Linear (out, in) or Conv2d (out, in/groups, k, k)
        return randn(*shape) / math.sqrt(fan_in)
    raise KeyError(f"no rule for {key} {shape}")


def random_official_state_dict(seed: int = 0) -> dict[str, Tensor]:
    """A deterministic random state dict with every official key, shape and dtype.

    Raises:
        FileNotFoundError: the manifest TSV is missing.
    """
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, Tensor] = {}
    for key, shape, dtype in read_manifest():
        if dtype == torch.int64:  # num_batches_tracked
            sd[key] = torch.zeros(shape, dtype=torch.int64)
            continue
        value = _value(key, shape, g)
        assert tuple(value.shape) == shape, (key, value.shape, shape)
        sd[key] = value.to(dtype).contiguous()
    return sd
