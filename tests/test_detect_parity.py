"""Acceptance: scanner scores equal norms of diffusers' own StableDiffusionPipeline predictions.

The pipeline runs unmodified; a forward hook on its UNet captures every prediction. The
expected score is computed here from those captures (epsilon space, float64), independently
of the scanner's code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scanner.detect import DetectSettings, Scanner
from scanner.model import load_model

PROMPTS = [
    "a photo of an astronaut riding a horse",
    "The No Limits Business Woman Podcast",
    "x",
    "a photo of an astronaut riding a horse",  # duplicate: scored once, same score
    " ".join(["long prompt words"] * 40),  # over 77 tokens: truncated as the pipeline does
    "Mothers influence on her young hippo",
    "¿Qué? café — naïve résumé 東京",
]
STEPS = 50
SEED = 3
LAST_STEP = 4  # the longest window below ends here; the pipeline is stopped after it


def _pipeline_norms(pipe, prompt: str, n: int, latents: torch.Tensor | None, index_seed: int | None) -> np.ndarray:
    """Per-step, per-generation ||eps_c - eps_u|| (float64) from the pipeline's own UNet calls."""
    captured = []
    hook = pipe.unet.register_forward_hook(
        lambda module, args, kwargs, out: captured.append((int(args[1]), out[0].detach().double())), with_kwargs=True
    )

    def stop_after_window(pipeline, step, timestep, callback_kwargs):
        if step + 1 >= LAST_STEP:
            pipeline._interrupt = True  # diffusers' own early exit: later steps are skipped
        return callback_kwargs

    try:
        if index_seed is not None:  # the reference's seeding: torch.manual_seed(i + gen_seed)
            torch.manual_seed(index_seed)
        pipe(
            prompt,
            num_images_per_prompt=n,
            num_inference_steps=STEPS,
            guidance_scale=7.5,
            latents=latents,
            output_type="latent",
            callback_on_step_end=stop_after_window,
        )
    finally:
        hook.remove()
    alphas = pipe.scheduler.alphas_cumprod.double()
    rows = []
    for t, out in captured:
        uncond, cond = out.chunk(2)
        diff = (cond - uncond).flatten(1).norm(dim=1)
        if pipe.scheduler.config.prediction_type == "v_prediction":
            diff = diff * math.sqrt(alphas[t])
        rows.append(diff.numpy())
    return np.stack(rows)  # [steps, n]


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def model_dir(request, tiny_sd1, tiny_sd2):
    return {"sd1": tiny_sd1, "sd2": tiny_sd2}[request.param]


@pytest.fixture(scope="module")
def scan_model(model_dir):
    return load_model(model_dir, device="cpu")


@pytest.fixture(scope="module")
def pipe(model_dir):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipeline_norms(pipe):
    """Captured norms `[LAST_STEP, n]` per (noise mode, generations, prompt), computed once."""
    cache = {}

    def get(noise: str, generations: int, i: int) -> np.ndarray:
        if (noise, generations, i) not in cache:
            if noise == "shared":
                cfg = pipe.unet.config
                shape = (generations, cfg.in_channels, cfg.sample_size, cfg.sample_size)
                latents = torch.randn(shape, generator=torch.Generator().manual_seed(SEED))
                cache[noise, generations, i] = _pipeline_norms(pipe, PROMPTS[i], generations, latents, None)
            else:
                cache[noise, generations, i] = _pipeline_norms(pipe, PROMPTS[i], generations, None, i + SEED)
        return cache[noise, generations, i]

    return get


@pytest.mark.parametrize("noise", ["shared", "reference"])
@pytest.mark.parametrize("generations", [1, 4])
@pytest.mark.parametrize("window", [(0, 1), (0, 3), (1, 4)])
@pytest.mark.parametrize("batch_size", [1, 7])
def test_scores_match_diffusers_pipeline(scan_model, pipeline_norms, noise, generations, window, batch_size):
    settings = DetectSettings(
        num_inference_steps=STEPS, start_step=window[0], end_step=window[1], generations=generations, seed=SEED, noise=noise
    )
    scanner = Scanner(scan_model, settings)
    got = []
    for start in range(0, len(PROMPTS), batch_size):
        batch = PROMPTS[start : start + batch_size]
        got.append(scanner.score(batch, list(range(start, start + len(batch)))).per_generation)
    got = np.concatenate(got)

    for i in range(len(PROMPTS)):
        expected = pipeline_norms(noise, generations, i)[window[0] : window[1]].mean(axis=0)
        np.testing.assert_allclose(got[i], expected, rtol=1e-4, err_msg=f"prompt {i}")


def test_reference_noise_depends_on_position_shared_does_not(tiny_sd1):
    model = load_model(tiny_sd1, device="cpu")
    shared = Scanner(model, DetectSettings(seed=SEED))
    reference = Scanner(model, DetectSettings(seed=SEED, noise="reference"))
    prompt = [PROMPTS[0]]
    assert shared.score(prompt).score[0] == Scanner(model, DetectSettings(seed=SEED)).score(prompt).score[0]
    assert reference.score(prompt, [0]).score[0] != reference.score(prompt, [1]).score[0]


def test_token_counts_and_truncation(tiny_sd1):
    scanner = Scanner(load_model(tiny_sd1, device="cpu"), DetectSettings())
    result = scanner.score(PROMPTS)
    expected = [len(scanner.model.tokenizer(p, add_special_tokens=False).input_ids) for p in PROMPTS]
    assert result.n_tokens == expected
    assert result.truncated == [n > 75 for n in expected]
    assert result.truncated[4] and not result.truncated[0]
