"""Ground truth by generation: does a prompt's generation reproduce a training image?

For every evaluation prompt, generate with the saved pipeline (DDIM, 50 steps, guidance
7.5, several seeds) and take each generation's normalized cross-correlation (NCC, pixel
space) with its nearest training image. A planted prompt reproduces its image when some
seed reaches `threshold` NCC with that image; a normal prompt "comes that close" when
some seed reaches `threshold` with any training image.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from .similarity import normalized_cross_correlation

if TYPE_CHECKING:
    from .build import TestbedData

REPRODUCTION_THRESHOLD = 0.8


@torch.no_grad()
def generate(pipe: StableDiffusionPipeline, prompts: list[str], seeds: int, batch_size: int = 256) -> np.ndarray:
    """Images [len(prompts), seeds, 3, H, W] in [0, 1]; seed s of every prompt uses torch seed s."""
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        generators = [torch.Generator().manual_seed(s) for _ in chunk for s in range(seeds)]
        images = pipe([p for p in chunk for _ in range(seeds)], num_inference_steps=50, guidance_scale=7.5,
                      generator=generators, output_type="pt").images
        out.append(images.reshape(len(chunk), seeds, *images.shape[1:]).float().numpy())
    return np.concatenate(out)


def load_pipeline(model_dir: str | Path) -> StableDiffusionPipeline:
    """The saved testbed pipeline in fp32, progress bars off."""
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def measure_reproduction(model_dir: str | Path, data: TestbedData, seeds: int = 4,
                         threshold: float = REPRODUCTION_THRESHOLD) -> dict:
    """Generate for every evaluation prompt of `data` and summarize reproduction per kind."""
    images = generate(load_pipeline(model_dir), [row["prompt"] for row in data.eval_prompts], seeds) * 2 - 1
    return reproduction_summary(images, data, threshold)


def reproduction_summary(images: np.ndarray, data: TestbedData, threshold: float = REPRODUCTION_THRESHOLD) -> dict:
    """Per kind, from generations [len(data.eval_prompts), seeds, 3, H, W] in [-1, 1]: reproduction and closeness."""
    prompts = [row["prompt"] for row in data.eval_prompts]
    seeds = images.shape[1]
    flat = images.reshape(-1, *images.shape[2:])
    ncc = normalized_cross_correlation(flat, data.images).reshape(len(prompts), seeds, len(data.images))
    best_any = ncc.max(axis=(1, 2))
    caption_index = {c: i for i, c in enumerate(data.captions)}
    summary: dict = {"measure": "normalized cross-correlation, pixel space, 16x16 RGB, each channel centred", "threshold": threshold,
                     "seeds": seeds, "sampler": "DDIM, 50 steps, guidance 7.5", "per_kind": {}}
    for kind in dict.fromkeys(row["kind"] for row in data.eval_prompts):
        rows = [i for i, row in enumerate(data.eval_prompts) if row["kind"] == kind]
        entry = {"n": len(rows), "mean_best_ncc_any": float(best_any[rows].mean()),
                 "frac_close_to_any": float((best_any[rows] >= threshold).mean())}
        if kind == "planted":
            own = np.array([ncc[i, :, caption_index[prompts[i]]].max() for i in rows])
            entry.update(mean_best_ncc_own=float(own.mean()), frac_reproduced=float((own >= threshold).mean()))
        summary["per_kind"][kind] = entry
    normal = [i for i, row in enumerate(data.eval_prompts) if row["label"] == 0]
    summary["planted_reproduced"] = summary["per_kind"]["planted"]["frac_reproduced"]
    summary["normal_close_to_training"] = float((best_any[normal] >= threshold).mean())
    return summary
