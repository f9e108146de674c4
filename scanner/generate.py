"""CFG generation with the model family's own diffusers pipeline, batched over seeds.

Generation takes a conditioning rather than a prompt, so that mitigation can generate from
an optimized embedding with the same initial latents.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .families import Conditioning, Family, cond_expand
from .model import ScanModel


def build_pipeline(model: ScanModel) -> Any:
    """The family's pipeline over the loaded components (diffusion families on DDIM, as scores are)."""
    return model.family.pipeline()


def seed_latents(model: ScanModel, seeds: Sequence[int]) -> torch.Tensor:
    """`[S, C, H, W]`: seed `s` draws its latent from a CPU generator seeded `s`, as diffusers does."""
    latents = [torch.randn((1, *model.latent_shape), generator=torch.Generator("cpu").manual_seed(s)) for s in seeds]
    return torch.cat(latents).to(model.device, model.dtype)


@torch.no_grad()
def generate_images(
    family: Family,
    pipeline: Any,
    cond: Conditioning,
    latents: torch.Tensor,
    num_inference_steps: int = 50,
    guidance_scale: float | None = None,
) -> np.ndarray:
    """Images `[S, H, W, 3]` uint8 for one conditioning (`[1, ...]` entries) and initial latents `[S, C, H, W]`;
    `guidance_scale` None: the family's pipeline default."""
    count = len(latents)
    if guidance_scale is None:
        guidance_scale = family.default_guidance_scale
    kwargs = family.generation_kwargs(
        cond_expand(cond, count), cond_expand(family.unconditional(), count), latents, guidance_scale
    )
    images = pipeline(**kwargs, num_inference_steps=num_inference_steps, output_type="np").images
    return (images * 255).round().astype(np.uint8)


def save_png(image: np.ndarray, path: Path) -> Path:
    """Write one `[H, W, 3]` uint8 image as PNG."""
    from PIL import Image

    Image.fromarray(image).save(path)
    return path


def image_grid(rows: Sequence[np.ndarray]) -> np.ndarray:
    """Tile rows of images `[S, H, W, 3]` into one `[rows*H, S*W, 3]` picture with 2-pixel gutters (raw pixels)."""
    count, height, width = rows[0].shape[:3]
    grid = np.full((len(rows) * (height + 2) - 2, count * (width + 2) - 2, 3), 255, dtype=np.uint8)
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            top, left = r * (height + 2), c * (width + 2)
            grid[top : top + height, left : left + width] = image
    return grid


# A testbed image is 16 x 16: shown at that size it is a dot. Display copies are scaled up by a
# whole factor with nearest neighbour, so every generated pixel stays one sharp, uniform block.
DISPLAY_SIDE = 256
LABEL_WIDTH = 150  # the row labels' column of `labelled_grid`
HEADER_HEIGHT = 28  # the column labels' row
GUTTER = 6
FONT_SIZE = 15


def upscale(image: np.ndarray, short_side: int = DISPLAY_SIDE) -> np.ndarray:
    """`[H, W, 3]` scaled by the smallest whole factor that makes its short side >= `short_side` (nearest neighbour)."""
    factor = max(1, -(-short_side // min(image.shape[:2])))
    return image.repeat(factor, axis=0).repeat(factor, axis=1)


def _font(size: int = FONT_SIZE):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def labelled_grid(
    rows: Sequence[np.ndarray], row_labels: Sequence[str], column_labels: Sequence[str], short_side: int = DISPLAY_SIDE
) -> np.ndarray:
    """Rows of images `[S, H, W, 3]`, each upscaled, with a label left of each row and above each column.

    Tile `(r, c)` starts at `(HEADER_HEIGHT + r * (side + GUTTER), LABEL_WIDTH + c * (side + GUTTER))`,
    side the upscaled tile's; labels may hold newlines."""
    from PIL import Image, ImageDraw

    tiles = [[upscale(image, short_side) for image in images] for images in rows]
    height, width = tiles[0][0].shape[:2]
    canvas = Image.new(
        "RGB",
        (LABEL_WIDTH + len(tiles[0]) * (width + GUTTER) - GUTTER, HEADER_HEIGHT + len(tiles) * (height + GUTTER) - GUTTER),
        "white",
    )
    draw, font = ImageDraw.Draw(canvas), _font()
    for c, label in enumerate(column_labels):
        draw.text((LABEL_WIDTH + c * (width + GUTTER) + width // 2, HEADER_HEIGHT // 2), label, fill="black", font=font,
                  anchor="mm")
    for r, (row, label) in enumerate(zip(tiles, row_labels)):
        top = HEADER_HEIGHT + r * (height + GUTTER)
        draw.multiline_text((8, top + height // 2), label, fill="black", font=font, anchor="lm", spacing=6)
        for c, tile in enumerate(row):
            canvas.paste(Image.fromarray(tile), (LABEL_WIDTH + c * (width + GUTTER), top))
    return np.asarray(canvas)
