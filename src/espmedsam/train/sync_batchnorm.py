"""Batch norm whose training statistics span every rank's share of the batch (CPU/gloo and CUDA/nccl).

TinyViT's conv stages use BatchNorm2d in train mode, so with the global batch split across ranks each
rank would normalise by its own share's statistics: a different forward, a different gradient and
different running statistics from one process on the whole batch. :func:`sync_batchnorm` swaps each
BatchNorm2d for :class:`SyncBatchNorm2d`, which all-reduces the per-channel count, mean and spread in the
forward and the two gradient sums in the backward, as on one process holding the whole batch. (Torch's own
``nn.SyncBatchNorm`` refuses CPU tensors.) Outside a process group, or in eval mode, it is BatchNorm2d.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from espmedsam.train import distributed

_DIMS = (0, 2, 3)  # (B, C, H, W): statistics per channel C


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with cross-rank training statistics; the same parameters, buffers and state_dict keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W) in x's dtype; B may be 0 on a rank with no images this step."""
        if not (self.training and self.track_running_stats and distributed.is_distributed()):
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        # as BatchNorm2d: momentum None means a cumulative average
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        weight = self.weight if self.weight is not None else torch.ones_like(self.running_mean)
        bias = self.bias if self.bias is not None else torch.zeros_like(self.running_mean)
        return _SyncNorm.apply(x, weight, bias, self.running_mean, self.running_var, self.eps, factor)


class _SyncNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x, weight, bias, running_mean, running_var, eps: float, factor: float):
        x32 = x.float()
        channels, count = x.shape[1], x32.numel() // max(x.shape[1], 1)
        local_sum = x32.sum(_DIMS, dtype=torch.float64)
        local_mean = local_sum / max(count, 1)
        spread = (x32 - local_mean.float().view(1, -1, 1, 1)).square().sum(_DIMS).double()
        # one collective of [n, sum, M2, sum^2 / n] (float64), whose totals give the union's mean and
        # M2 = sum M2 + sum sum^2 / n - N mean^2
        stats = torch.cat([local_sum.new_tensor([count]), local_sum, spread, local_sum * local_mean])
        stats = distributed.all_reduce_sum(stats)
        total, sums, spreads, squares = stats[0], *stats[1:].split(channels)
        mean = sums / total
        m2 = (spreads + squares - total * mean.square()).clamp_min(0)
        var = m2 / total
        with torch.no_grad():
            running_mean.mul_(1 - factor).add_(factor * mean.to(running_mean.dtype))
            unbiased = m2 / max(float(total) - 1, 1.0)
            running_var.mul_(1 - factor).add_(factor * unbiased.to(running_var.dtype))
        invstd = torch.rsqrt(var + eps).float()
        normalised = (x32 - mean.float().view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)
        ctx.save_for_backward(normalised, weight, invstd)
        ctx.total = float(total)
        out = normalised * weight.float().view(1, -1, 1, 1) + bias.float().view(1, -1, 1, 1)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        normalised, weight, invstd = ctx.saved_tensors
        g = grad.float()
        sum_g, sum_gx = g.sum(_DIMS), (g * normalised).sum(_DIMS)
        # the gradient of every rank's loss reaches this rank's inputs through the shared statistics
        reduced = distributed.all_reduce_sum(torch.cat([sum_g, sum_gx]))
        mean_g, mean_gx = (reduced / ctx.total).chunk(2)
        scale = (invstd * weight.float()).view(1, -1, 1, 1)
        grad_x = (g - mean_g.view(1, -1, 1, 1) - normalised * mean_gx.view(1, -1, 1, 1)) * scale
        # parameter gradients stay local: DDP averages them over the ranks
        return grad_x.to(grad.dtype), sum_gx.to(weight.dtype), sum_g.to(weight.dtype), None, None, None, None


def sync_batchnorm(model: nn.Module) -> Callable[[], None]:
    """Make every BatchNorm2d of ``model`` a :class:`SyncBatchNorm2d` in place (same objects, so the
    optimiser's parameters and the state_dict are untouched); returns the function that undoes it."""
    swapped = [module for module in model.modules() if type(module) is nn.BatchNorm2d]
    for module in swapped:
        module.__class__ = SyncBatchNorm2d

    def undo() -> None:
        for module in swapped:
            module.__class__ = nn.BatchNorm2d

    return undo
