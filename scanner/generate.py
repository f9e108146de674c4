"""Standard CFG DDIM generation (diffusers' `StableDiffusionPipeline`), batched over seeds.

Generation takes a text embedding rather than a prompt, so that mitigation can generate
from an optimized embedding with the same initial latents.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .errors import MemscanError
from .model import ScanModel

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline


def build_pipeline(model: ScanModel) -> StableDiffusionPipeline:
    """A `StableDiffusionPipeline` over the loaded components, with a DDIM scheduler."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    if model.vae is None:
        raise MemscanError(f"{model.source}: the model has no vae/, so it cannot generate images")
    pipe = StableDiffusionPipeline(
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        unet=model.unet,
        scheduler=DDIMScheduler.from_config(model.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seed_latents(model: ScanModel, seeds: Sequence[int]) -> torch.Tensor:
    """`[S, C, H, W]`: seed `s` draws its latent from a CPU generator seeded `s`, as diffusers does."""
    latents = [torch.randn((1, *model.latent_shape), generator=torch.Generator("cpu").manual_seed(s)) for s in seeds]
    return torch.cat(latents).to(model.device, model.dtype)


@torch.no_grad()
def generate_images(
    pipeline: StableDiffusionPipeline,
    embedding: torch.Tensor,
    empty_embedding: torch.Tensor,
    latents: torch.Tensor,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
) -> np.ndarray:
    """Images `[S, H, W, 3]` uint8 for one text embedding `[1, L, D]` and initial latents `[S, C, H, W]`."""
    count = len(latents)
    images = pipeline(
        prompt_embeds=embedding.expand(count, -1, -1),
        negative_prompt_embeds=empty_embedding.expand(count, -1, -1),
        latents=latents,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        output_type="np",
    ).images
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

