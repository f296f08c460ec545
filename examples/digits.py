"""The examples' data: scikit-learn's bundled 8x8 digits (1,797 images, ten classes), shuffled by a
seed. Each example splits them as it needs; run from this directory, or with it on sys.path."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def shuffled(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The images as float32 rows of 64 values in [0, 1] and their labels as int64, in the order
    `seed` draws."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    return (x[order] / 16.0).astype(np.float32), y[order].astype(np.int64)


def torch_split(seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """`shuffled` as tensors: 1,400 to train, the rest to test."""
    x, y = (torch.from_numpy(a) for a in shuffled(seed))
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The model's test accuracy in percent, in eval mode."""
    model.eval()
    return float((model(x).argmax(1) == y).float().mean()) * 100
