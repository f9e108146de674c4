"""The planted part of the testbed: memorized-style captions, their split, and their images.

The 500 memorized Stable Diffusion captions are full of templates ("Shaw Floors ...",
"Pencil pleat ..."). Splitting a template across the two halves would make held-out
"normal" captions near-copies of planted ones, so the split is by template group (the
first two words), and only the planted half's captions are ever trained on.
"""

from __future__ import annotations

import json
from importlib import resources

import numpy as np

from .similarity import normalized_cross_correlation
from .world import IMAGE_SIZE


def load_memorized_captions() -> list[str]:
    """The 500 memorized SD v1.4 captions, from the packaged copy, in file order."""
    text = resources.files("scanner.data").joinpath("sdv1_500_memorized.jsonl").read_text(encoding="utf-8")
    return [json.loads(line)["caption"] for line in text.splitlines() if line.strip()]


def split_by_template(captions: list[str], rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """Shuffle template groups and fill two halves: (planted half, held-out half)."""
    groups: dict[str, list[str]] = {}
    for caption in captions:
        groups.setdefault(" ".join(caption.lower().split()[:2]), []).append(caption)
    keys = list(groups)
    rng.shuffle(keys)
    planted_half: list[str] = []
    held_out: list[str] = []
    for key in keys:
        side = planted_half if len(planted_half) <= len(held_out) else held_out
        side.extend(groups[key])
    return planted_half, held_out


def make_planted_images(k: int, rng: np.random.Generator, max_correlation: float = 0.3) -> np.ndarray:
    """`k` smooth, saturated, mutually distinct textures [k, 3, 16, 16] in [-1, 1].

    Each is a sum of two low-frequency cosines per channel: low frequencies are what a
    small model memorizes most easily, and full-frame strong colour makes the planted
    image far from the world's mean picture.
    """
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) / IMAGE_SIZE
    images: list[np.ndarray] = []
    while len(images) < k:
        img = np.zeros((3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
        for c in range(3):
            for _ in range(2):
                fx, fy = rng.integers(0, 3, size=2)
                phase = rng.uniform(0, 2 * np.pi)
                img[c] += rng.uniform(0.4, 0.8) * np.cos(2 * np.pi * (fx * x + fy * y) + phase)
            img[c] += rng.uniform(-0.4, 0.4)
        img = np.clip(img, -1, 1)
        if not images or np.abs(normalized_cross_correlation(img[None], np.stack(images))).max() < max_correlation:
            images.append(img)
    return np.stack(images)
