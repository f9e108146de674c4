"""Tiny random SDXL and PixArt pipelines built from configs (no downloads), and the checks their tests share.

The components, call capture and float64 gradient are tests/tiny_families.py's. The checks
compare memscan against the unmodified diffusers pipeline's denoiser calls: scores (float32),
explain's gradient (float64) and mitigation.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tiny_families import (
    capture_calls,
    clip_config,
    clip_tokenizer,
    float64_significance,
    seeded,
    split_call,
    t5_tokenizer,
    tiny_t5_encoder,
    tiny_vae,
)

from scanner.detect import DetectSettings, Scanner
from scanner.explain.gradient import token_significance
from scanner.mitigate import MitigationSettings, optimize_embedding
from scanner.model import ScanModel

STEPS = 50
LAST_STEP = 4  # the longest window the tests score ends here; pipeline runs stop after it
RUN = {"num_inference_steps": STEPS, "guidance_scale": 7.5}  # every pipeline call's
PROMPTS = [
    "a photo of an astronaut riding a horse",
    "The No Limits Business Woman Podcast",
    "x",
    "a photo of an astronaut riding a horse",  # duplicate: scored once, same score
    " ".join(["long prompt words"] * 50),  # 150 words: over CLIP's 77 and PixArt-α's 120 tokens
    "  Mothers influence on her young hippo ",  # PixArt strips and lowercases
    "¿Qué? café — naïve résumé 東京",
]
# The T5 tokenizer's whole-word pieces: the prompts' words and some common ones.
WORDS = set(" ".join(PROMPTS).lower().split()) | set(
    "the of and in on with at by for from to is it this that red green blue black white yellow small large old new "
    "man woman dog cat tree house city street car sky sun night day water river mountain forest beach portrait "
    "painting art style oil digital detailed high quality light dark golden hour cinematic sharp focus landscape "
    "studio realistic anime cartoon sketch drawing illustration poster cover album book film movie scene".split()
)


def build_tiny_sdxl(out_dir: Path, seed: int = 0) -> Path:
    """Save an SDXL base pipeline folder (two CLIP encoders, text-time UNet, 8x8 latents) with random weights."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(8, 16),
            norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids and the pooled projection
            cross_attention_dim=64,  # both encoders' widths
        )
        text_encoder = CLIPTextModel(clip_config(32))
        text_encoder_2 = CLIPTextModelWithProjection(clip_config(32))
        vae = tiny_vae()
    # SDXL's two tokenizers differ only in padding: end-of-text for the first, "!" for the second.
    tokenizers = [clip_tokenizer(out_dir, name, pad) for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!"))]
    # SDXL ships an Euler config; memscan and the tests both build DDIM from it.
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1], unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False,
    ).save_pretrained(out_dir)
    return out_dir


def build_tiny_pixart(out_dir: Path, variant: str = "alpha", sample_size: int = 8, patch_size: int = 2, seed: int = 0) -> Path:
    """Save a PixArt-α (`alpha`) or PixArt-Σ (`sigma`) pipeline folder: tiny T5, learned-sigma DiT, random weights.

    α at `sample_size` 128 conditions on resolution and aspect ratio; a large `patch_size` keeps it cheap.
    """
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel

    tokenizer = t5_tokenizer(WORDS, 120 if variant == "alpha" else 300)
    with seeded(seed):
        transformer = PixArtTransformer2DModel(
            sample_size=sample_size,
            num_layers=2,
            patch_size=patch_size,
            attention_head_dim=8,
            num_attention_heads=3,
            caption_channels=32,
            in_channels=4,
            cross_attention_dim=24,
            out_channels=8,  # epsilon and the learned variance
            attention_bias=True,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
        )
        text_encoder = tiny_t5_encoder(len(tokenizer), 32)
        vae = tiny_vae()
    pipeline = PixArtAlphaPipeline if variant == "alpha" else PixArtSigmaPipeline
    # PixArt ships a DPM-Solver config; memscan and the tests both build DDIM from it.
    pipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
             scheduler=DPMSolverMultistepScheduler()).save_pretrained(out_dir)
    return out_dir


def load_pipeline(cls: Any, path: Path, dtype: torch.dtype = torch.float32) -> Any:
    """The saved pipeline `path` as diffusers loads it, with DDIM swapped in (memscan's trajectory)."""
    from diffusers import DDIMScheduler

    pipe = cls.from_pretrained(path)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype)


class PipelineNorms:
    """Per-step `||eps_c - eps_u||` (float64) of a pipeline's own denoiser calls on all `PROMPTS`, once per n.

    `epsilon` takes the epsilon part of the denoiser's raw output (PixArt: the first half of its channels).
    """

    def __init__(self, pipe: Any, module: torch.nn.Module, epsilon: Callable[[torch.Tensor], torch.Tensor],
                 latent_shape: tuple[int, int, int], seed: int, steps: int = LAST_STEP, **call: Any):
        self.pipe, self.module, self.epsilon = pipe, module, epsilon
        self.latent_shape, self.seed, self.steps, self.call = latent_shape, seed, steps, call
        self._cache: dict[int, np.ndarray] = {}

    def __call__(self, generations: int) -> np.ndarray:
        """`[steps, len(PROMPTS), generations]` norms, every prompt on the scanner's shared latents."""
        if generations not in self._cache:
            # The scanner's shared latents, drawn here independently (one CPU generator seeded with the seed),
            # for every prompt: the pipeline's rows are prompt-major.
            generator = torch.Generator().manual_seed(self.seed)
            shared = torch.randn((generations, *self.latent_shape), generator=generator)
            calls = capture_calls(self.pipe, self.module, self.steps, prompt=PROMPTS, num_images_per_prompt=generations,
                                  latents=shared.repeat(len(PROMPTS), 1, 1, 1), **RUN, **self.call)
            rows = []
            for _, _, out in calls:
                uncond, cond = self.epsilon(out.double()).chunk(2)
                rows.append((cond - uncond).flatten(1).norm(dim=1).view(len(PROMPTS), generations).numpy())
            self._cache[generations] = np.stack(rows)
        return self._cache[generations]


def assert_scores_match(model: ScanModel, norms: PipelineNorms, window: tuple[int, int], generations: int) -> None:
    """Scanner scores in batches of 1 and of 7 equal the pipeline's norms averaged over the window, within 1e-4."""
    settings = DetectSettings(num_inference_steps=STEPS, start_step=window[0], end_step=window[1],
                              generations=generations, guidance_scale=RUN["guidance_scale"], seed=norms.seed)
    expected = norms(generations)[window[0] : window[1]].mean(axis=0)
    for batch_size in (1, 7):
        scanner = Scanner(model, settings)  # fresh: no prompt cache carried between batch sizes
        got = np.concatenate([scanner.score(PROMPTS[i : i + batch_size]).per_generation
                              for i in range(0, len(PROMPTS), batch_size)])
        context = f"[prompt, generation], batch size {batch_size}, seed {norms.seed}"
        np.testing.assert_allclose(got, expected, rtol=1e-4, err_msg=context)
    # The scores tell prompts apart: one number for every prompt would pass the comparison too.
    assert expected.min() > 0 and not np.allclose(expected[0], expected[1]), f"seed {norms.seed}"


def as_float64(model: ScanModel) -> ScanModel:
    """A freshly loaded `model` with every module and the family's dtype in float64 (two gradients then agree to rounding)."""
    for module in model.family.modules():
        module.double()
    model.family.dtype = torch.float64
    return dataclasses.replace(model, dtype=torch.float64)


def assert_gradient_matches(model64: ScanModel, pipe64: Any, module: torch.nn.Module,
                            epsilon: Callable[[torch.Tensor], torch.Tensor], window: tuple[int, int], generations: int,
                            **call: Any) -> None:
    """explain's token significance equals autograd on the float64 pipeline's own denoiser calls over the window."""
    seed = random.randrange(2**31)
    settings = DetectSettings(num_inference_steps=STEPS, start_step=window[0], end_step=window[1],
                              generations=generations, guidance_scale=RUN["guidance_scale"], seed=seed)
    scanner = Scanner(model64, settings)
    got = token_significance(scanner, [PROMPTS[1], "x"])
    calls = capture_calls(pipe64, module, window[1], prompt=PROMPTS[1], num_images_per_prompt=generations,
                          latents=scanner.shared_latents(), **RUN, **call)
    expected = float64_significance(module, [split_call(c) for c in calls[window[0] :]], epsilon)
    np.testing.assert_allclose(got[0], expected, rtol=1e-5, atol=1e-12, err_msg=f"seed {seed}")
    assert got[0].std() > 0, f"seed {seed}"  # positions differ: a constant would pass a loose check


def assert_mitigation_lowers_score(model: ScanModel, prompt: str, iterations: int = 3) -> None:
    """`optimize_embedding` (target 0, lr 0.1) runs every iteration, lowers the score, moves only what may move."""
    seed = random.randrange(2**31)
    scanner = Scanner(model, DetectSettings(generations=2, seed=seed))
    settings = MitigationSettings(target=0.0, learning_rate=0.1, max_iterations=iterations)
    result = optimize_embedding(scanner, prompt, scanner.shared_latents(), settings)
    context = f"seed {seed}"
    assert result.score_before == pytest.approx(float(scanner.score([prompt]).score[0]), rel=1e-5), context
    assert result.iterations == iterations and result.score_after < result.score_before, context
    family = scanner.family
    encoded = family.encode([prompt])
    assert result.conditioning.keys() == encoded.keys()
    for key, value in encoded.items():
        moved, fixed = result.conditioning[key], value.shape[1]  # entries not trained stay whole
        if key in family.trainable_keys:
            fixed = family.frozen_positions if key == family.sequence_key else 0
        assert torch.equal(moved[:, :fixed], value[:, :fixed]), f"{key}: frozen positions moved, {context}"
        if fixed < value.shape[1]:
            assert not torch.allclose(moved[:, fixed:], value[:, fixed:]), f"{key} did not move, {context}"


def assert_generation_matches_prompts(model: ScanModel, **call: Any) -> None:
    """The family's pipeline fed memscan's conditioning (`generation_kwargs`) ends where it does from the prompts."""
    from scanner.families import cond_expand

    family, prompts, seed = model.family, PROMPTS[:2], random.randrange(2**31)
    latents = torch.randn((len(prompts), *model.latent_shape), generator=torch.Generator().manual_seed(seed))
    pipe = family.pipeline()
    uncond = cond_expand(family.unconditional(), len(prompts))
    kwargs = family.generation_kwargs(family.encode(prompts), uncond, latents, 7.5)
    got = pipe(**kwargs, num_inference_steps=3, output_type="latent").images
    want = pipe(prompt=prompts, latents=latents, guidance_scale=7.5, num_inference_steps=3, output_type="latent",
                **call).images
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{m}\nseed {seed}")
