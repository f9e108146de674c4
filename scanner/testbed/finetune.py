"""`memscan finetune`: the testbed recipe trained with or without the memorization filter, and measured.

The unfiltered run is the testbed build itself (same loop, same draws), so its figures
can also be measured on an existing build (`evaluate_build`). Both runs are measured the
same way: planted reproduction (the ground truth's generations and NCC), denoising loss
on fresh normal pairs with fixed noise and timesteps, and the colour attribute check on
the generations of the normal evaluation prompts that name a colour.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from ..errors import MemscanError
from .attributes import another_colour, shows_colour
from .build import BuildConfig, TestbedData, encode_images, load_build_data, torch_threads, train_testbed
from .filtering import FilterSettings
from .groundtruth import DDIM_SAMPLER, generate, load_pipeline, reproduction_summary, similarity
from .planted import load_memorized_captions
from .recipes import tokenize, training_scheduler
from .world import make_normal_pairs

# Held-out normal pairs, their noise and timesteps, and the attribute check's "other colour":
# fixed, so that every run is measured on the same draws.
EVAL_SEED = 1_000_003
HELD_OUT_PAIRS = 2048
CHUNK = 256
REPORT = "finetune.json"
REPORT_KEYS = {"filtered", "filter", "planted_reproduced", "held_out_normal_loss", "attributes"}  # what --compare reads


@torch.no_grad()
def held_out_loss(pipe: StableDiffusionPipeline, cfg: BuildConfig, pairs: int = HELD_OUT_PAIRS) -> float:
    """Mean epsilon-prediction MSE on `pairs` fresh normal pairs (not trained on), fixed noise and timesteps."""
    rng = np.random.default_rng(EVAL_SEED)
    images, captions, _ = make_normal_pairs(pairs, rng, load_memorized_captions(), pipe.tokenizer,
                                            junk_fraction=cfg.junk_fraction)
    latents = encode_images(pipe.vae, torch.from_numpy(images)) * pipe.vae.config.scaling_factor
    scheduler, generator = training_scheduler(), torch.Generator().manual_seed(EVAL_SEED)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (pairs,), generator=generator)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    ids = tokenize(pipe.tokenizer, captions)
    losses = [
        (pipe.unet(x, t, encoder_hidden_states=pipe.text_encoder(i)[0]).sample - n).pow(2).flatten(1).mean(dim=1)
        for x, t, i, n in zip(noisy.split(CHUNK), timesteps.split(CHUNK), ids.split(CHUNK), noise.split(CHUNK))
    ]
    return float(torch.cat(losses).mean())


def attribute_check(images: np.ndarray, colours: list[str]) -> dict:
    """Share of generations [n, seeds, 3, H, W] showing their prompt's colour, and (chance) another colour."""
    rng = np.random.default_rng(EVAL_SEED)
    others = [another_colour(c, rng) for c in colours]
    return {
        "prompts": len(colours),
        "generations": int(images.shape[0] * images.shape[1]),
        "named_colour_shown": float(np.mean([shows_colour(img, c) for img, c in zip(images, colours)])),
        "other_colour_shown": float(np.mean([shows_colour(img, c) for img, c in zip(images, others)])),
    }


def evaluate_model(folder: Path, data: TestbedData, cfg: BuildConfig) -> dict:
    """Planted reproduction, held-out normal loss and the attribute check of a saved testbed pipeline."""
    with torch_threads(cfg.threads):  # as the build measures its ground truth
        return _evaluate_model(folder, data, cfg)


def _evaluate_model(folder: Path, data: TestbedData, cfg: BuildConfig) -> dict:
    rows = [i for i, row in enumerate(data.eval_prompts) if row["kind"] == "planted" or data.eval_colours[i]]
    subset = replace(data, eval_prompts=[data.eval_prompts[i] for i in rows], eval_colours=[data.eval_colours[i] for i in rows])
    pipe = load_pipeline(folder)
    # One set of generations serves both checks: planted prompts and colour-naming normal ones.
    sampler = DDIM_SAMPLER.with_steps(cfg.groundtruth_steps)  # as the build measured its ground truth
    images = generate(pipe, [row["prompt"] for row in subset.eval_prompts], cfg.groundtruth_seeds, sampler) * 2 - 1
    coloured = [j for j, colour in enumerate(subset.eval_colours) if colour]
    groundtruth = reproduction_summary(similarity(images, subset), subset, sampler=sampler)
    return {
        "planted_reproduced": groundtruth["planted_reproduced"],
        "held_out_normal_loss": held_out_loss(pipe, cfg),
        "attributes": attribute_check(images[coloured], [subset.eval_colours[j] for j in coloured]),
        "groundtruth": groundtruth,
    }


def _write_report(out: Path, report: dict) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def run_finetune(out: str | Path, seed: int, cfg: BuildConfig, filtering: FilterSettings | None,
                 log: Callable[[str], None] = lambda _: None, command: str = "") -> dict:
    """Train the testbed recipe into `out` (filtered unless `filtering` is None), measure it, write finetune.json."""
    out = Path(out)
    trained = train_testbed(out, seed, cfg, log, filtering)
    started = time.time()
    evaluation = evaluate_model(out, trained.data, cfg)
    return _write_report(out, {
        "command": command, "model": str(out), "seed": seed, "filtered": filtering is not None, "config": asdict(cfg),
        "filter": trained.denoiser.filter_stats, "train_seconds": round(trained.train_seconds, 1),
        "eval_seconds": round(time.time() - started, 1), **evaluation,
    })


def evaluate_build(build: str | Path, out: str | Path, seed: int, cfg: BuildConfig, command: str = "") -> dict:
    """The unfiltered run's report from an existing `memscan testbed build` of the same recipe and seed."""
    build = Path(build)
    data = load_build_data(build)
    stats = json.loads((build / "testbed_stats.json").read_text(encoding="utf-8"))
    if stats["seed"] != seed or stats["config"] != json.loads(json.dumps(asdict(cfg))):
        raise MemscanError(f"{build} was built with another seed or recipe than this run's (seed {stats['seed']})")
    started = time.time()
    evaluation = evaluate_model(build, data, cfg)
    return _write_report(Path(out), {
        "command": command, "model": str(build), "seed": seed, "filtered": False, "config": asdict(cfg),
        "filter": None, "train_seconds": stats["train_seconds"], "eval_seconds": round(time.time() - started, 1),
        **evaluation,
    })


def comparison_table(unfiltered: dict, filtered: dict, overhead: dict | None = None) -> str:
    """The README's Markdown table: both runs' figures side by side, with the issue's acceptance.

    Quality must be kept, so the colour check fails only when the filtered run is more than
    5 points below the unfiltered one. `overhead` is `bench/finetune_overhead.py`'s result.
    """
    base_loss, loss = unfiltered["held_out_normal_loss"], filtered["held_out_normal_loss"]
    base_attr, attr = unfiltered["attributes"], filtered["attributes"]
    dropped = filtered["filter"]["dropped_share"]
    rows = [
        ("planted prompts reproduced (NCC >= 0.8, 4 seeds)", f"{unfiltered['planted_reproduced']:.1%}",
         f"{filtered['planted_reproduced']:.1%}",
         _verdict("without >= 90%, with <= 20%",
                  unfiltered["planted_reproduced"] >= 0.9 and filtered["planted_reproduced"] <= 0.2)),
        ("held-out normal pairs: denoising loss", f"{base_loss:.4f}", f"{loss:.4f}",
         _verdict(f"within 10% ({loss / base_loss - 1:+.1%})", abs(loss / base_loss - 1) <= 0.1)),
        (f"normal prompts' colour shown ({attr['prompts']} prompts x {attr['generations'] // attr['prompts']} seeds)",
         f"{base_attr['named_colour_shown']:.1%}", f"{attr['named_colour_shown']:.1%}",
         _verdict(f"at most 5 points below ({100 * (attr['named_colour_shown'] - base_attr['named_colour_shown']):+.1f})",
                  attr["named_colour_shown"] >= base_attr["named_colour_shown"] - 0.05)),
        ("same generations, another colour (chance)", f"{base_attr['other_colour_shown']:.1%}",
         f"{attr['other_colour_shown']:.1%}", ""),
        ("samples dropped: planted / normal", "0 / 0", f"{dropped['planted']:.1%} / {dropped['normal']:.2%}", ""),
        ("steps skipped (every sample dropped)", "0", str(filtered["filter"]["skipped_steps"]), ""),
        ("training wall time (data, VAE, denoiser; shared machine)", f"{unfiltered['train_seconds'] / 60:.1f} min",
         f"{filtered['train_seconds'] / 60:.1f} min", ""),
    ]
    if overhead:
        cpu, wall = overhead["seconds"]["cpu"], overhead["seconds"]["wall"]
        rows.append((f"{overhead['steps']} steps side by side: CPU time (wall time), median",
                     f"{np.median(cpu['unfiltered']):.1f} s ({np.median(wall['unfiltered']):.1f} s)",
                     f"{np.median(cpu['filtered']):.1f} s ({np.median(wall['filtered']):.1f} s)",
                     f"overhead {overhead['overhead_cpu']:+.0%} CPU ({overhead['overhead_wall']:+.0%} wall)"))
    lines = ["| | without filter | with filter | acceptance |", "| --- | --- | --- | --- |"]
    return "\n".join(lines + [f"| {' | '.join(row)} |" for row in rows])


def _verdict(rule: str, met: bool) -> str:
    return f"{rule}: {'met' if met else 'NOT met'}"
