"""The planted part of the testbed: memorized-style captions, their split, and their images.

The 500 memorized Stable Diffusion captions are full of templates ("Shaw Floors ...",
"... - Throw Pillow", "... iPhone 6 Case"). Splitting a template across the two halves
would make held-out "normal" captions near-copies of planted ones (a first prototype's
top-scoring negatives were exactly those), so the split is by template group: captions
that share a content bigram, transitively. Only the planted half is ever trained on.
"""

from __future__ import annotations

import json
import re
from importlib import resources

import numpy as np

from .similarity import normalized_cross_correlation
from .world import IMAGE_SIZE


def load_memorized_captions() -> list[str]:
    """The 500 memorized SD v1.4 captions, from the packaged copy, in file order."""
    text = resources.files("scanner.data").joinpath("sdv1_500_memorized.jsonl").read_text(encoding="utf-8")
    return [json.loads(line)["caption"] for line in text.splitlines() if line.strip()]


# Words too common to tie two captions to one template.
STOP_WORDS = frozenset("a an the of in on and with for to by at from is new first".split())


def content_bigrams(caption: str) -> set[tuple[str, str]]:
    """Adjacent word pairs of a caption (lower-case alphanumeric words), stop-word pairs left out."""
    words = re.findall(r"[a-z0-9]+", caption.lower())
    return {(a, b) for a, b in zip(words, words[1:]) if a not in STOP_WORDS and b not in STOP_WORDS}


def template_groups(captions: list[str]) -> list[list[str]]:
    """Captions joined (transitively) when they share a content bigram: "throw pillow", "shaw floors", ..."""
    parent = list(range(len(captions)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_with: dict[tuple[str, str], int] = {}
    for i, caption in enumerate(captions):
        for bigram in content_bigrams(caption):
            parent[root(i)] = root(first_with.setdefault(bigram, i))
    groups: dict[int, list[str]] = {}
    for i, caption in enumerate(captions):
        groups.setdefault(root(i), []).append(caption)
    return list(groups.values())


def split_by_template(captions: list[str], rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """Shuffle template groups and fill two halves: (planted half, held-out half)."""
    groups = template_groups(captions)
    planted_half: list[str] = []
    held_out: list[str] = []
    for i in rng.permutation(len(groups)):
        side = planted_half if len(planted_half) <= len(held_out) else held_out
        side.extend(groups[i])
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
        # Image-wide centring here: the build that made the shipped textures used it.
        if not images or np.abs(
            normalized_cross_correlation(img[None], np.stack(images), per_channel=False)
        ).max() < max_correlation:
            images.append(img)
    return np.stack(images)
