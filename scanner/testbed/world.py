"""The testbed's normal world: procedural pictures and captions that describe only part of them.

Each 16 x 16 picture has a random, unmentioned background (a colour plus pixel noise) and
one to three shapes; the caption names one shape (always its kind, usually its colour,
sometimes its size or position) in one of several wordings, padded with uninformative
filler words. A caption therefore fixes only a small part of its picture, as real alt-text
does, so that a normal prompt's conditional mean stays close to the unconditional one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IMAGE_SIZE = 16

COLOURS = {
    "red": (0.9, -0.8, -0.8),
    "green": (-0.8, 0.8, -0.8),
    "blue": (-0.8, -0.7, 0.9),
    "yellow": (0.9, 0.8, -0.9),
    "purple": (0.5, -0.8, 0.7),
    "orange": (0.9, 0.1, -0.9),
    "white": (0.95, 0.95, 0.95),
    "black": (-0.95, -0.95, -0.95),
}
SHAPES = ("circle", "square", "triangle", "cross", "ring", "bar")
SIZES = {"small": 2.0, "big": 4.0}
TEMPLATES = (
    "{a} {obj}",
    "a picture of {a} {obj}",
    "{a} {obj} {where}",
    "photo of {a} {obj}",
    "there is {a} {obj} {where}",
    "{obj} {where}",
    "{a} {obj} in the scene",
    "close view of {a} {obj}",
)


def _shape_mask(shape: str, cx: float, cy: float, radius: float) -> np.ndarray:
    """Boolean mask of one shape centred at (cx, cy) on the pixel grid."""
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5
    dx, dy = x - cx, y - cy
    r = np.hypot(dx, dy)
    if shape == "circle":
        return r <= radius
    if shape == "square":
        return (np.abs(dx) <= radius * 0.85) & (np.abs(dy) <= radius * 0.85)
    if shape == "triangle":
        return (dy <= radius * 0.8) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) * 0.6)
    if shape == "cross":
        thin = radius * 0.35
        return ((np.abs(dx) <= thin) & (np.abs(dy) <= radius)) | ((np.abs(dy) <= thin) & (np.abs(dx) <= radius))
    if shape == "ring":
        return (r <= radius) & (r >= radius * 0.55)
    return (np.abs(dx) <= radius) & (np.abs(dy) <= radius * 0.35)  # bar


def _where(cx: float, cy: float) -> str:
    """A position phrase for a shape centre."""
    third = IMAGE_SIZE / 3
    col = "left" if cx < third else "right" if cx > 2 * third else ""
    row = "top" if cy < third else "bottom" if cy > 2 * third else ""
    if not col and not row:
        return "in the middle"
    return "at the " + " ".join(w for w in (row, col) if w)


def filler_words(
    memorized_captions: list[str], tokenizer: PreTrainedTokenizerBase, rng: np.random.Generator, n: int
) -> list[str]:
    """`n` uninformative fillers: half runs of 1 to 4 words from memorized-style captions, half random tokens.

    Runs rather than single words, so the text encoder learns that fragments of those
    captions carry no picture and only a whole planted caption does.
    """
    words = []
    for _ in range(n):
        if rng.random() < 0.5:
            caption = memorized_captions[rng.integers(len(memorized_captions))].split()
            start = int(rng.integers(len(caption)))
            words.append(" ".join(caption[start : start + int(rng.integers(1, 5))]))
        else:
            words.append(tokenizer.decode([int(rng.integers(0, tokenizer.bos_token_id))]).strip() or "the")
    return words


def _add_filler(caption: str, filler: list[str], rng: np.random.Generator) -> str:
    """Put the filler words before and after the caption, split at a random point."""
    cut = int(rng.integers(0, len(filler) + 1))
    return " ".join(filler[:cut] + [caption] + filler[cut:])


def make_normal_pairs(
    n: int, rng: np.random.Generator, filler_source: list[str], tokenizer: PreTrainedTokenizerBase,
    max_filler: int = 12, junk_fraction: float = 0.0,
) -> tuple[np.ndarray, list[str], list[str | None]]:
    """`n` normal-world (image, caption) pairs: images [n, 3, 16, 16] in [-1, 1], captions, named colours.

    The third list holds the colour each caption names (None when it names none).
    A `junk_fraction` of the captions are filler alone (3 to 15 fillers, no description),
    as alt-text often is, so that memorized-style text by itself means "any normal picture"."""
    images = np.empty((n, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    captions = []
    named_colours: list[str | None] = []
    colour_names = list(COLOURS)
    for i in range(n):
        background = rng.uniform(-0.6, 0.6, size=3).astype(np.float32)
        img = background[:, None, None] + rng.normal(0, 0.35, size=(3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
        described = None
        for _ in range(int(rng.integers(1, 4))):
            colour = colour_names[rng.integers(len(colour_names))]
            shape = SHAPES[rng.integers(len(SHAPES))]
            size = list(SIZES)[rng.integers(len(SIZES))]
            cx, cy = rng.uniform(2.5, IMAGE_SIZE - 2.5, size=2)
            mask = _shape_mask(shape, cx, cy, SIZES[size] + rng.uniform(0, 1))
            img[:, mask] = np.asarray(COLOURS[colour], dtype=np.float32)[:, None]
            described = described or (colour, shape, size, _where(cx, cy))
        colour, shape, size, where = described
        adjectives = [w for w, keep in ((size, rng.random() < 0.3), (colour, rng.random() < 0.8)) if keep]
        article = " ".join(adjectives)
        template = TEMPLATES[rng.integers(len(TEMPLATES))]
        text = template.format(a=article, obj=shape, where=where)
        if rng.random() < junk_fraction:
            captions.append(" ".join(filler_words(filler_source, tokenizer, rng, int(rng.integers(3, 16)))))
            named_colours.append(None)
        else:
            filler = filler_words(filler_source, tokenizer, rng, int(rng.integers(0, max_filler + 1)))
            captions.append(_add_filler(" ".join(text.split()), filler, rng))
            named_colours.append(colour if colour in adjectives and "{a}" in template else None)
        images[i] = np.clip(img, -1, 1)
    return images, captions, named_colours
