"""Ground truth by generation: does a prompt's generation reproduce a training image?

For every evaluation prompt, generate with the saved pipeline and its family's own sampler
(SD: DDIM, 50 steps, guidance 7.5; SD 3: flow matching Euler, 28 steps, guidance 7.0), with
several seeds, and take each generation's normalized cross-correlation (NCC, pixel
space) with its nearest training image. A planted prompt reproduces its image when some
seed reaches `threshold` NCC with that image; a normal prompt "comes that close" when
some seed reaches `threshold` with any training image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from diffusers import DiffusionPipeline

from .similarity import normalized_cross_correlation

if TYPE_CHECKING:
    from .build import TestbedData

REPRODUCTION_THRESHOLD = 0.8
GROUNDTRUTH_LABELS = "groundtruth_labels.jsonl"  # a build's evaluation prompts labelled by their generations


@dataclass(frozen=True)
class Sampler:
    """A family's own sampler: its name, steps and guidance, prompts per pipeline call, further call options."""

    name: str
    steps: int
    guidance: float
    batch_size: int = 256
    options: tuple[tuple[str, object], ...] = ()

    def describe(self) -> str:
        """E.g. "DDIM, 50 steps, guidance 7.5"."""
        return f"{self.name}, {self.steps} steps, guidance {self.guidance}"

    def with_steps(self, steps: int | None) -> Sampler:
        """This sampler with `steps` steps (None: as it is; a build config's `groundtruth_steps`)."""
        return self if steps is None else replace(self, steps=steps)


DDIM_SAMPLER = Sampler("DDIM", steps=50, guidance=7.5)


@torch.no_grad()
def generate(pipe: DiffusionPipeline, prompts: list[str], seeds: int, sampler: Sampler = DDIM_SAMPLER) -> np.ndarray:
    """Images [len(prompts), seeds, 3, H, W] in [0, 1]; seed s of every prompt uses torch seed s."""
    out = []
    for start in range(0, len(prompts), sampler.batch_size):
        chunk = prompts[start : start + sampler.batch_size]
        generators = [torch.Generator().manual_seed(s) for _ in chunk for s in range(seeds)]
        images = pipe([p for p in chunk for _ in range(seeds)], num_inference_steps=sampler.steps,
                      guidance_scale=sampler.guidance, generator=generators, output_type="pt", **dict(sampler.options)).images
        out.append(images.reshape(len(chunk), seeds, *images.shape[1:]).float().numpy())
    return np.concatenate(out)


def load_pipeline(model_dir: str | Path) -> DiffusionPipeline:
    """The saved testbed pipeline (its model_index.json's class) in fp32, progress bars off.

    Components saved as absent (null in model_index.json, as SD 3's text_encoder_3) are
    passed as None: diffusers loads only its optional components' nulls by itself.
    """
    index = json.loads((Path(model_dir) / "model_index.json").read_text(encoding="utf-8"))
    absent = {name: None for name, entry in index.items() if entry == [None, None]}
    pipe = DiffusionPipeline.from_pretrained(model_dir, torch_dtype=torch.float32, **absent)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass(frozen=True)
class Similarity:
    """Per evaluation prompt, the best NCC over its seeds with its own training image (nan: it has none) and with any."""

    own: np.ndarray  # [len(data.eval_prompts)]
    any: np.ndarray  # [len(data.eval_prompts)]
    seeds: int


def similarity(images: np.ndarray, data: TestbedData) -> Similarity:
    """From generations [len(data.eval_prompts), seeds, 3, H, W] in [-1, 1]: each prompt's best NCC, own image and any."""
    prompts = [row["prompt"] for row in data.eval_prompts]
    seeds = images.shape[1]
    ncc = normalized_cross_correlation(images.reshape(-1, *images.shape[2:]), data.images)
    ncc = ncc.reshape(len(prompts), seeds, len(data.images))
    caption_index = {c: i for i, c in enumerate(data.captions)}
    own = np.array([ncc[i, :, caption_index[p]].max() if row["kind"] == "planted" else np.nan
                    for i, (p, row) in enumerate(zip(prompts, data.eval_prompts))])
    return Similarity(own=own, any=ncc.max(axis=(1, 2)), seeds=seeds)


def measure_reproduction(pipe: DiffusionPipeline, data: TestbedData, seeds: int = 4,
                         sampler: Sampler = DDIM_SAMPLER) -> Similarity:
    """Generate for every evaluation prompt of `data` with `sampler` and compare with the training images."""
    prompts = [row["prompt"] for row in data.eval_prompts]
    return similarity(generate(pipe, prompts, seeds, sampler) * 2 - 1, data)


def reproduction_summary(sim: Similarity, data: TestbedData, threshold: float = REPRODUCTION_THRESHOLD,
                         sampler: Sampler = DDIM_SAMPLER) -> dict:
    """Per kind: reproduction (planted) and closeness to any training image; per copy count too in a dose build."""
    summary: dict = {"measure": "normalized cross-correlation, pixel space, 16x16 RGB, each channel centred", "threshold": threshold,
                     "seeds": sim.seeds, "sampler": sampler.describe(), "per_kind": {}}
    for kind in dict.fromkeys(row["kind"] for row in data.eval_prompts):
        rows = [i for i, row in enumerate(data.eval_prompts) if row["kind"] == kind]
        entry = {"n": len(rows), "mean_best_ncc_any": float(sim.any[rows].mean()),
                 "frac_close_to_any": float((sim.any[rows] >= threshold).mean())}
        if kind == "planted":
            entry.update(mean_best_ncc_own=float(sim.own[rows].mean()), frac_reproduced=float((sim.own[rows] >= threshold).mean()))
        summary["per_kind"][kind] = entry
    normal = [i for i, row in enumerate(data.eval_prompts) if row["label"] == 0]
    summary["planted_reproduced"] = summary["per_kind"]["planted"]["frac_reproduced"]
    summary["normal_close_to_training"] = float((sim.any[normal] >= threshold).mean())
    copies = [(row["copies"], i) for i, row in enumerate(data.eval_prompts) if "copies" in row]
    if copies:
        summary["planted_reproduced_by_copies"] = {
            str(c): float((sim.own[[i for k, i in copies if k == c]] >= threshold).mean()) for c in sorted({k for k, _ in copies})}
    return summary


def labelled_by_generation(sim: Similarity, data: TestbedData, threshold: float = REPRODUCTION_THRESHOLD) -> list[dict]:
    """The evaluation prompts labelled by their generations: a planted prompt is memorized (1) only if it reproduced.

    Planted prompts that did not reproduce keep label 0 under kind "planted_not_reproduced";
    every row gains its best NCC with any training image (and a planted one with its own).
    """
    rows = []
    for i, row in enumerate(data.eval_prompts):
        row = {**row, "best_ncc_any": round(float(sim.any[i]), 4)}
        if row["kind"] == "planted":
            reproduced = bool(sim.own[i] >= threshold)
            row.update(label=int(reproduced), kind="planted" if reproduced else "planted_not_reproduced",
                       best_ncc_own=round(float(sim.own[i]), 4))
        rows.append(row)
    return rows
