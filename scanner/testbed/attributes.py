"""The testbed's attribute check: does a generated picture still show the colour its caption names?

Normal captions name one shape, usually with its colour (`world.COLOURS`), so a rule can
check fidelity without a learned classifier: count the pixels within `tolerance` (max over
RGB channels) of the named colour. Backgrounds are mid-range colours plus noise, so a
saturated shape colour rarely appears by chance (`tests/test_testbed.py` measures both rates).
"""

from __future__ import annotations

import numpy as np

from .world import COLOURS

COLOUR_TOLERANCE = 0.25
MIN_PIXELS = 4


def colour_pixels(images: np.ndarray, colour: str, tolerance: float = COLOUR_TOLERANCE) -> np.ndarray:
    """Per image [n, 3, H, W] in [-1, 1]: how many pixels lie within `tolerance` of `colour`."""
    target = np.asarray(COLOURS[colour], dtype=np.float32)[None, :, None, None]
    return (np.abs(images - target).max(axis=1) <= tolerance).sum(axis=(1, 2))


def shows_colour(images: np.ndarray, colour: str, min_pixels: int = MIN_PIXELS) -> np.ndarray:
    """Per image [n, 3, H, W] in [-1, 1]: True where at least `min_pixels` pixels have the named colour."""
    return colour_pixels(images, colour) >= min_pixels


def another_colour(colour: str, rng: np.random.Generator) -> str:
    """A colour other than `colour`, drawn uniformly: the chance baseline of `shows_colour`."""
    names = list(COLOURS)
    return names[(names.index(colour) + int(rng.integers(1, len(names)))) % len(names)]
