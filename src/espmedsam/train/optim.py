"""AdamW with parameter groups and a linear-warmup + cosine (or constant) learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from espmedsam.config import TrainConfig

# parameters kept out of weight decay besides every 0-D/1-D tensor (norms, biases): learned tokens/tables
NO_DECAY_NAMES: tuple[str, ...] = ("prompt", "query", "attention_biases")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weights with ``weight_decay``, and norms, biases and prompt/query tokens without."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim < 2 or any(key in name for key in NO_DECAY_NAMES):
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW at ``config.lr`` over :func:`parameter_groups`."""
    return torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr)


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base lr after ``step`` optimiser steps: linear warmup from 1/warmup, then
    cosine down to ``min_ratio`` at ``total_steps`` (or constant 1)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> LambdaLR:
    """A per-step ``LambdaLR`` of :func:`lr_factor` over ``config.total_steps`` (its state is step counts)."""

    def factor(step: int) -> float:
        return lr_factor(
            step,
            warmup_steps=config.warmup_steps,
            total_steps=config.total_steps,
            schedule=config.schedule,
            min_ratio=config.min_lr_ratio,
        )

    return LambdaLR(optimizer, factor)
