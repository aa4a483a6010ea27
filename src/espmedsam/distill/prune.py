"""Structured pruning of the encoder's hidden widths, the output layers refitted by least squares.

Every attention block's MLP (fc1 -> GELU -> fc2) and every stage-0 MBConv (1x1 -> depthwise 3x3 -> 1x1)
widen their channels four times inside; those hidden channels are most of the encoder's FLOPs and, at
stage 0's full input resolution, most of its memory traffic. Pruning removes hidden channels one at a
time by Optimal Brain Surgeon (as SparseGPT does for weights, here for whole channels): each step drops
the channel whose loss the remaining ones can best make up, and updates the output layer so that it
reproduces the full layer's output on calibration images as closely as least squares allows. The only
statistics needed are each layer's hidden-activation Gram matrix over the calibration images, one
forward pass for all layers. No gradient step is taken; the decoders see an embedding close to the one
they were trained on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from espmedsam.config import ModelConfig
from espmedsam.data.sampler import same_size_batches
from espmedsam.errors import InputError
from espmedsam.models.common import NormMLP
from espmedsam.models.espmedsam import ESPMedSAM
from espmedsam.models.registry import build_model
from espmedsam.models.tinyvit import MBConv

BATCHNORM_EPS = 1e-5  # nn.BatchNorm2d's default, which Conv2dBN keeps
DAMPING = 0.01  # ridge added to the Gram's diagonal, as a fraction of its mean (GPTQ's ``percdamp``)
SURGEON_ROUND = 16  # channels removed between exact refits


@dataclasses.dataclass(frozen=True)
class PruneWidths:
    """Fractions of hidden channels kept: stage 0's MBConvs, and the MLPs of each attention stage."""

    mbconv: float = 1.0
    mlp: tuple[float, ...] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        for fraction in (self.mbconv, *self.mlp):
            if not 0 < fraction <= 1:
                raise InputError(f"a kept fraction must be in (0, 1], got {fraction}")


class HiddenGram:
    """Running Gram matrix of a layer's hidden activations with a constant channel appended.

    Every image counts once whatever its size: its rows are averaged before they are added.
    """

    def __init__(self, channels: int) -> None:
        self.sum = torch.zeros(channels + 1, channels + 1, dtype=torch.float64)
        self.images = 0

    def add(self, hidden: torch.Tensor) -> None:
        """``hidden``: (B, N, C) activations, N rows of each of B images."""
        for rows in hidden.float():
            # centred in float32, the mean added back in float64: an uncentred float32 Gram of large-mean
            # activations loses their variance to rounding and is no longer positive definite
            mean = rows.mean(0, dtype=torch.float64)
            centred = rows - mean.float()
            moments = torch.cat([mean, mean.new_ones(1)])
            self.sum[:-1, :-1] += (centred.T @ centred).double() / rows.shape[0]
            self.sum += torch.outer(moments, moments)
            self.images += 1

    @property
    def matrix(self) -> torch.Tensor:
        return self.sum / max(self.images, 1)


def prunable_layers(model: ESPMedSAM) -> dict[str, nn.Module]:
    """Each MBConv of stage 0 and each attention block's MLP, by module name."""
    return {
        name: module
        for name, module in model.image_encoder.named_modules(prefix="image_encoder")
        if isinstance(module, (MBConv, NormMLP)) and ".controllers." not in name
    }


def collect_grams(
    model: ESPMedSAM,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    bf16: bool = True,
    progress: Callable[[int], None] | None = None,
) -> dict[str, HiddenGram]:
    """The hidden-activation Gram of every prunable layer over ``batches`` of (images, modality ids)."""
    layers = prunable_layers(model)
    grams = {name: HiddenGram(_hidden_width(layer)) for name, layer in layers.items()}
    hooks = [
        _reader(layer).register_forward_pre_hook(_gram_hook(grams[name], layer))
        for name, layer in layers.items()
    ]
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for images, modality in batches:
                model.encode(images, modality)
                if progress:
                    progress(images.shape[0])
    finally:
        for hook in hooks:
            hook.remove()
    return grams


def pruned_model(model: ESPMedSAM, grams: dict[str, HiddenGram], widths: PruneWidths) -> ESPMedSAM:
    """A copy of ``model`` with the hidden channels ``widths`` keeps, output layers refitted (eval mode)."""
    layers = prunable_layers(model)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    kept: dict[str, int] = {}
    for name, layer in layers.items():
        fraction = widths.mbconv if isinstance(layer, MBConv) else widths.mlp[_stage(name) - 1]
        channels = _hidden_width(layer)
        keep = max(1, round(channels * fraction))
        kept[name] = keep
        if keep < channels:
            _prune_layer(state, name, layer, grams[name].matrix, keep)
    student = build_model(_pruned_config(model.config, layers, kept))
    student.load_state_dict(state)
    return student.eval()


def _pruned_config(config: ModelConfig, layers: dict[str, nn.Module], kept: dict[str, int]) -> ModelConfig:
    mbconv = tuple(kept[name] for name, layer in layers.items() if isinstance(layer, MBConv))
    mlp = tuple(kept[name] for name, layer in layers.items() if isinstance(layer, NormMLP))
    encoder = dataclasses.replace(config.encoder, mbconv_hidden_dims=mbconv, mlp_hidden_dims=mlp)
    return dataclasses.replace(config, encoder=encoder)


def _stage(name: str) -> int:
    """``image_encoder.layers.<stage>.blocks...`` -> stage."""
    return int(name.split(".")[2])


def _reader(layer: nn.Module) -> nn.Module:
    """The layer that reads the hidden channels: an MLP's fc2, an MBConv's last 1x1 conv."""
    return layer.fc2 if isinstance(layer, NormMLP) else layer.conv3


def _hidden_width(layer: nn.Module) -> int:
    return layer.fc2.in_features if isinstance(layer, NormMLP) else layer.conv3.c.in_channels


def _gram_hook(gram: HiddenGram, layer: nn.Module) -> Callable:
    def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        hidden = inputs[0]
        if isinstance(layer, MBConv):  # (B, C, H, W) -> (B, HW, C)
            hidden = hidden.flatten(2).transpose(1, 2)
        gram.add(hidden.reshape(hidden.shape[0], -1, hidden.shape[-1]))

    return hook


def surgeon_keep(weight: torch.Tensor, gram: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal Brain Surgeon over whole input channels of a linear map.

    Args:
        weight: (out, C + 1) weights of the map on the hidden channels and a constant (the bias last).
        gram: (C + 1, C + 1) Gram matrix of those inputs (the constant last, never removed).
        keep: hidden channels to keep.
    Returns:
        The kept channels' indices (ascending), and the (out, keep + 1) weights on them and the constant
        that best reproduce ``weight``'s output in the least-squares sense.
    """
    gram = gram.double()
    weight = weight.double()
    channels = gram.shape[0] - 1
    damped = gram + DAMPING * gram.diagonal().mean() * torch.eye(channels + 1, dtype=gram.dtype)
    alive = torch.arange(channels + 1)
    while len(alive) - 1 > keep:
        # the surgeon's rank-one updates drift over hundreds of steps: start each round afresh from the
        # exact least-squares fit of the channels still alive
        inverse = torch.linalg.inv(damped[alive][:, alive])
        fitted = _refit(weight, gram, alive, inverse)
        removed = []
        for _ in range(min(SURGEON_ROUND, len(alive) - 1 - keep)):
            cost = (fitted**2).sum(0) / inverse.diagonal()
            cost[-1] = torch.inf  # the constant stays
            if removed:
                cost[removed] = torch.inf
            j = int(cost.argmin())
            fitted = fitted - torch.outer(fitted[:, j], inverse[j]) / inverse[j, j]
            inverse = inverse - torch.outer(inverse[:, j], inverse[j]) / inverse[j, j]
            removed.append(j)
        alive = alive[[i for i in range(len(alive)) if i not in set(removed)]]
    inverse = torch.linalg.inv(damped[alive][:, alive])
    return alive[:-1], _refit(weight, gram, alive, inverse)


def _refit(
    weight: torch.Tensor, gram: torch.Tensor, alive: torch.Tensor, inverse: torch.Tensor
) -> torch.Tensor:
    """(out, len(alive)) least-squares weights on the ``alive`` inputs reproducing ``weight``'s output;
    ``inverse`` is the (damped) inverse Gram of those inputs."""
    return weight @ gram[:, alive] @ inverse


def _prune_layer(
    state: dict[str, torch.Tensor], name: str, layer: nn.Module, gram: torch.Tensor, keep: int
) -> None:
    if isinstance(layer, NormMLP):
        _prune_mlp(state, name, gram, keep)
    else:
        _prune_mbconv(state, name, gram, keep)


def _prune_mlp(state: dict[str, torch.Tensor], name: str, gram: torch.Tensor, keep: int) -> None:
    fc1, fc2 = f"{name}.fc1", f"{name}.fc2"
    full = torch.cat([state[f"{fc2}.weight"], state[f"{fc2}.bias"][:, None]], dim=1)
    index, refit = surgeon_keep(full, gram, keep)
    state[f"{fc1}.weight"] = state[f"{fc1}.weight"][index].contiguous()
    state[f"{fc1}.bias"] = state[f"{fc1}.bias"][index].contiguous()
    state[f"{fc2}.weight"] = refit[:, :-1].float().contiguous()
    state[f"{fc2}.bias"] = refit[:, -1].float().contiguous()


def _prune_mbconv(state: dict[str, torch.Tensor], name: str, gram: torch.Tensor, keep: int) -> None:
    """conv1's output channels and conv2's channels cut, conv3 refitted before its batch norm (the
    constant term goes into the norm's running mean). The surgeon weighs each output by the norm's scale,
    so its errors are those of the block's output."""
    bn = f"{name}.conv3.bn"
    scale = state[f"{bn}.weight"] * torch.rsqrt(state[f"{bn}.running_var"] + BATCHNORM_EPS)
    weight = state[f"{name}.conv3.c.weight"][:, :, 0, 0] * scale[:, None]  # (out, C)
    full = torch.cat([weight, torch.zeros(weight.shape[0], 1)], dim=1)
    index, refit = surgeon_keep(full, gram, keep)
    refit = refit.float() / torch.where(scale == 0, 1.0, scale)[:, None]  # a zero scale: an output off
    state[f"{name}.conv3.c.weight"] = refit[:, :-1, None, None].contiguous()
    state[f"{bn}.running_mean"] = state[f"{bn}.running_mean"] - refit[:, -1]
    for conv in ("conv1", "conv2"):
        state[f"{name}.{conv}.c.weight"] = state[f"{name}.{conv}.c.weight"][index].contiguous()
        for statistic in ("weight", "bias", "running_mean", "running_var"):
            key = f"{name}.{conv}.bn.{statistic}"
            state[key] = state[key][index].contiguous()


def calibration_batches(
    samples: Sequence, batch_size: int = 4
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Samples (``distill.prefix.PrefixSample``) of one input size at a time, in batches."""
    for batch in same_size_batches([sample.image.shape[-1] for sample in samples], batch_size):
        chunk = [samples[i] for i in batch]
        yield torch.stack([s.image for s in chunk]), torch.tensor([s.modality for s in chunk])


def pruned_parameters(model: ESPMedSAM) -> list[nn.Parameter]:
    """The parameters of every prunable layer: what the distillation after pruning trains."""
    return [param for layer in prunable_layers(model).values() for param in layer.parameters()]


def decoding_parameters(model: ESPMedSAM) -> list[nn.Parameter]:
    """What turns the embedding into the prompt-free masks: the modality controllers, the embedding
    refiner, SPPG and QDMD (with its detail branch). Trained beside the pruned layers, they can follow
    the pruned embedding to the original's masks, where the pruned layers alone only approach its
    embedding."""
    controllers = [param for name, param in model.image_encoder.named_parameters() if ".controllers." in name]
    decoding = [model.refiner, model.sppg, model.decoder]
    return controllers + [p for module in decoding if module is not None for p in module.parameters()]


def is_pruned_from(student: ESPMedSAM, teacher: ESPMedSAM) -> bool:
    """Whether ``student`` is ``teacher``'s network with (possibly) narrower hidden widths."""
    return _full_widths(student.config) == _full_widths(teacher.config)


def _full_widths(config: ModelConfig) -> ModelConfig:
    encoder = dataclasses.replace(config.encoder, mbconv_hidden_dims=(), mlp_hidden_dims=())
    return dataclasses.replace(config, encoder=encoder)
