"""Pixel-space similarity used for the testbed's ground truth: normalized cross-correlation."""

from __future__ import annotations

import numpy as np


def normalized_cross_correlation(a: np.ndarray, b: np.ndarray, per_channel: bool = True) -> np.ndarray:
    """NCC of every image in `a` [n, C, H, W] with every image in `b` [m, C, H, W]: an [n, m] matrix in [-1, 1].

    Images are centred (each colour channel on its own mean by default, else on one mean
    over all channels), then scaled to unit norm. Per-channel centring compares spatial
    layout; with one mean, two flat backgrounds of similar colour correlate at 0.8 and more.
    """
    def unit(x: np.ndarray) -> np.ndarray:
        axes = (2, 3) if per_channel else (1, 2, 3)
        centred = x.astype(np.float64) - x.mean(axis=axes, keepdims=True)
        flat = centred.reshape(len(x), -1)
        return flat / (np.linalg.norm(flat, axis=1, keepdims=True) + 1e-8)

    return unit(a) @ unit(b).T
