"""The examples' data: scikit-learn's bundled 8x8 digits (1,797 images, ten classes), shuffled by a
seed. Each example splits them as it needs; run from this directory, or with it on sys.path."""

from __future__ import annotations

import numpy as np


def shuffled(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The images as float32 rows of 64 values in [0, 1] and their labels as int64, in the order
    `seed` draws."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    return (x[order] / 16.0).astype(np.float32), y[order].astype(np.int64)
