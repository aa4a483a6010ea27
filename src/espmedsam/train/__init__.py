"""Segmentation training (paper-notes §6): ``train(config)`` and what it returns and reports."""

from espmedsam.train.loop import TrainProgress, TrainResult, train

__all__ = ["TrainProgress", "TrainResult", "train"]
