"""Per-modality input sizes on the accuracy/cost front: the cheapest size within a tolerance of the best.

``export --choose-sizes-on`` scores every candidate size on each modality's validation split
(``evaluate.choose_input_sizes``); the cost of a size is the forward's matmul and convolution FLOPs at it,
which rise with the side, so among the sizes whose validation Dice lies within ``tolerance`` of the
modality's best the cheapest is the smallest. The front is drawn as one panel per modality.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

TOLERANCE = 0.005  # Dice a size may lose against the modality's best and still be chosen


def cheapest_within(
    scores: Mapping[int, float], costs: Mapping[int, float], tolerance: float = TOLERANCE
) -> int:
    """The size of least cost whose score is at least ``max(scores) - tolerance`` (ties: the smaller side).

    Raises:
        ValueError: no scores, or a size without a cost.
    """
    if not scores:
        raise ValueError("no candidate sizes were scored")
    best = max(scores.values())
    eligible = [size for size, score in scores.items() if score >= best - tolerance]
    return min(eligible, key=lambda size: (costs[size], size))


def forward_gflop(model: torch.nn.Module, modality: str, sizes: Sequence[int]) -> dict[int, float]:
    """GFLOP (matmuls and convolutions, torch's FlopCounterMode) of one forward at each input side."""
    from torch.utils.flop_counter import FlopCounterMode

    costs = {}
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:  # the counter's module tracker hooks gradients of any tensor argument that requires them
        for parameter in trainable:
            parameter.requires_grad_(False)
        for size in sizes:
            x = torch.zeros(1, 3, size, size)
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                model(x, [modality])
            costs[size] = counter.get_total_flops() / 1e9
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)
    return costs


def plot_front(
    scores: Mapping[str, Mapping[int, float]],
    costs: Mapping[str, Mapping[int, float]],
    chosen: Mapping[str, int],
    path: Path,
    tolerance: float = TOLERANCE,
) -> Path:
    """One panel per modality: validation Dice against GFLOP per candidate size, the tolerance band under
    the best, the chosen size circled. Needs matplotlib (``espmedsam[plot]``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modalities = list(scores)
    columns = min(3, len(modalities))
    rows = -(-len(modalities) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False)
    for axis, modality in zip(axes.flat, modalities, strict=False):
        sizes = sorted(scores[modality])
        x = [costs[modality][s] for s in sizes]
        y = [scores[modality][s] for s in sizes]
        axis.plot(x, y, "o-", color="tab:blue")
        for size, gflop, dice in zip(sizes, x, y, strict=True):
            axis.annotate(f"{size}²", (gflop, dice), textcoords="offset points", xytext=(4, -10), fontsize=8)
        best = max(y)
        axis.axhspan(
            best - tolerance, best, color="tab:green", alpha=0.15, label=f"within {tolerance} of best"
        )
        pick = chosen[modality]
        axis.plot(
            [costs[modality][pick]], [scores[modality][pick]], "o", ms=12, mfc="none", mec="tab:red", mew=2
        )
        axis.set_title(f"{modality}: {pick}² chosen")
        axis.set_xlabel("GFLOP per image")
        axis.set_ylabel("validation Dice")
    for axis in list(axes.flat)[len(modalities) :]:
        axis.axis("off")
    axes.flat[0].legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
