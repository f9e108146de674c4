"""Pixel-space similarity used for the testbed's ground truth: normalized cross-correlation."""

from __future__ import annotations

import numpy as np


def normalized_cross_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """NCC of every image in `a` [n, ...] with every image in `b` [m, ...]: an [n, m] matrix in [-1, 1].

    Each image is centred on its own mean over all pixels and channels and scaled to unit
    norm, so the measure ignores brightness and contrast but not colour or layout.
    """
    def unit(x: np.ndarray) -> np.ndarray:
        flat = x.reshape(len(x), -1).astype(np.float64)
        flat = flat - flat.mean(axis=1, keepdims=True)
        return flat / (np.linalg.norm(flat, axis=1, keepdims=True) + 1e-8)

    return unit(a) @ unit(b).T
