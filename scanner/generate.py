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
    guidance_scale: float = 7.5,
) -> np.ndarray:
    """Images `[S, H, W, 3]` uint8 for one conditioning (`[1, ...]` entries) and initial latents `[S, C, H, W]`."""
    count = len(latents)
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
    """Tile rows of images `[S, H, W, 3]` into one `[rows*H, S*W, 3]` picture with 2-pixel gutters."""
    count, height, width = rows[0].shape[:3]
    grid = np.full((len(rows) * (height + 2) - 2, count * (width + 2) - 2, 3), 255, dtype=np.uint8)
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            top, left = r * (height + 2), c * (width + 2)
            grid[top : top + height, left : left + width] = image
    return grid

