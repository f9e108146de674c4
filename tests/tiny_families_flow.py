"""Tiny random flow-matching pipelines (SD 3, Flux) built from configs, and the checks both families share.

Sizes follow diffusers' own `get_dummy_components` (tests/pipelines/stable_diffusion_3,
tests/pipelines/flux); the components, call capture and float64 gradient are
tests/tiny_families.py's. The checks compare memscan against the family's unmodified diffusers
pipeline's transformer calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tiny_families import (
    Call,
    capture_calls,
    clip_config,
    clip_tokenizer,
    float64_significance,
    seeded,
    t5_tokenizer,
    tiny_t5_encoder,
    tiny_vae,
)

from scanner.detect import DetectSettings, Scanner
from scanner.explain.gradient import token_significance
from scanner.mitigate import MitigationSettings, optimize_embedding
from scanner.model import ScanModel

PROMPTS = [
    "a photo of an astronaut riding a horse on the moon",
    "Living in the light with Ann Graham Lotz",
    "z",
    "a photo of an astronaut riding a horse on the moon",  # duplicate: scored once, same score
    " ".join(["many repeated words"] * 40),  # past 77 CLIP tokens and past the T5 length: truncated
    "an oil painting of a lighthouse at dusk, 4k",
    "¿Qué? café — naïve résumé 東京",
]
# The T5 tokenizer's whole words: every other word is spelled out, which takes the long prompt past 512 tokens.
WORDS = "a an the of on in with photo painting".split()


def build_tiny_sd3(out_dir: Path, with_t5: bool = True, seed: int = 0) -> Path:
    """Save a `StableDiffusion3Pipeline` folder (CLIP widths 16 + 24 padded to T5's 48); `with_t5=False` leaves text_encoder_3 out."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    # The real SD3's CLIP-L pads with its end token, CLIP-G with "!".
    clip_l, clip_g = clip_tokenizer(out_dir, "clip0", "<|endoftext|>"), clip_tokenizer(out_dir, "clip1", "!")
    t5 = t5_tokenizer(WORDS)
    with seeded(seed):
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
            caption_projection_dim=32, joint_attention_dim=48, pooled_projection_dim=40, out_channels=4,
        )
        text_encoder = CLIPTextModelWithProjection(clip_config(16))
        text_encoder_2 = CLIPTextModelWithProjection(clip_config(24))
        text_encoder_3 = tiny_t5_encoder(len(t5), 48) if with_t5 else None
        vae = tiny_vae(4, shift_factor=0.0609)
    # Without T5, the scheduler shifts by resolution (mu), so both of the pipeline's timestep paths are covered.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0) if with_t5 else FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae,
        text_encoder=text_encoder, tokenizer=clip_l, text_encoder_2=text_encoder_2, tokenizer_2=clip_g,
        text_encoder_3=text_encoder_3, tokenizer_3=t5 if with_t5 else None,
    )
    pipe.save_pretrained(out_dir)
    return out_dir


def build_tiny_flux(out_dir: Path, seed: int = 0) -> Path:
    """Save a guidance-distilled `FluxPipeline` folder (1 latent channel, packed to 4) with Flux.1-dev's scheduler config."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    clip, t5 = clip_tokenizer(out_dir, "clip0", "<|endoftext|>"), t5_tokenizer(WORDS)
    with seeded(seed):
        # Narrower attention than diffusers' dummy (one head of 8): the default 1024 px image is 4096 packed tokens.
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=1,
            joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[2, 2, 4], guidance_embeds=True,
        )
        text_encoder = CLIPTextModel(clip_config(32))
        text_encoder_2 = tiny_t5_encoder(len(t5), 32)
        vae = tiny_vae(1, shift_factor=0.1159)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    pipe = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=clip,
        text_encoder_2=text_encoder_2, tokenizer_2=t5, transformer=transformer,
    )
    pipe.save_pretrained(out_dir)
    return out_dir


# -- what the pipeline does ------------------------------------------------------------------------
class TinyPipeline:
    """A saved tiny model loaded twice, by memscan and as the family's diffusers pipeline; the pipeline's norms, cached.

    Subclasses say how the pipeline takes latents and how its transformer calls pair into (cond, uncond) per step.
    """

    steps = 28  # both pipelines' default num_inference_steps
    last_step = 3  # the longest window ends here
    calls_per_step = 1  # transformer calls the pipeline makes per step

    def __init__(self, model: ScanModel, pipe: Any, seed: int, guidance: float, context: str):
        self.model, self.pipe, self.seed, self.guidance = model, pipe, seed, guidance
        self.context = f"{context}, seed {seed}, guidance {guidance:.3f}"
        self._norms: dict[tuple, np.ndarray] = {}

    def latent_shape(self) -> tuple[int, int, int]:
        """One latent's shape at the pipeline's default resolution, read from the pipeline."""
        raise NotImplementedError

    def pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents `[R, C, H, W]` as the pipeline's `latents=` takes them."""
        return latents

    def extra_call(self, prompts: list[str]) -> dict:
        """Arguments the pipeline call for `prompts` needs besides them, the latents and the step count."""
        return {"guidance_scale": self.guidance}

    def step_pairs(self, calls: list[Call]) -> list[tuple[Call, Call]]:
        """Each step's (conditional, unconditional) transformer call."""
        raise NotImplementedError

    def latents(self, n: int) -> torch.Tensor:
        """The scanner's shared latents: `n` drawn from a CPU generator seeded `seed`."""
        return torch.randn((n, *self.latent_shape()), generator=torch.Generator().manual_seed(self.seed))

    def calls(self, n: int, prompts: list[str], steps: int) -> list[Call]:
        """The pipeline's transformer calls of its first `steps` steps for `prompts`, `n` images each, all from the same latents."""
        latents = self.pipeline_latents(self.latents(n).repeat(len(prompts), 1, 1, 1))
        return capture_calls(
            self.pipe, self.pipe.transformer, steps * self.calls_per_step, prompt=prompts, num_images_per_prompt=n,
            latents=latents, num_inference_steps=self.steps, **self.extra_call(prompts),
        )

    def norms(self, n: int, prompts: list[str], steps: int) -> np.ndarray:
        """`[>= steps, prompts * n]`: `||v_cond - v_uncond||` at each step (float64), the pipeline run as far as asked."""
        key = n, tuple(prompts)
        # A first-step check runs one step, not the longest window's: each Flux step is a 4096-token forward.
        if key not in self._norms or len(self._norms[key]) < steps:
            pairs = self.step_pairs(self.calls(n, prompts, steps))
            self._norms[key] = np.stack([(c[2].double() - u[2].double()).flatten(1).norm(dim=1).numpy() for c, u in pairs])
        return self._norms[key]

    def settings(self, window: tuple[int, int], generations: int) -> DetectSettings:
        """Scanner settings matching the pipeline runs."""
        return DetectSettings(
            num_inference_steps=self.steps, start_step=window[0], end_step=window[1], generations=generations,
            seed=self.seed, guidance_scale=self.guidance,
        )


# -- the shared checks ---------------------------------------------------------------------------------
def check_parity(tiny: TinyPipeline, window: tuple[int, int], generations: int, batch_sizes: Sequence[int],
                 prompts: list[str]) -> None:
    """The scanner's per-generation scores, batch by batch, equal the window's mean of the pipeline's norms (1e-4 relative)."""
    expected = tiny.norms(generations, prompts, window[1])[window[0] : window[1]].mean(axis=0).reshape(len(prompts), generations)
    for batch_size in batch_sizes:
        context = f"window {window}, n {generations}, batch {batch_size}, {tiny.context}"
        scanner = Scanner(tiny.model, tiny.settings(window, generations))  # fresh: no prompt cache carried between batch sizes
        got = np.concatenate([scanner.score(prompts[i : i + batch_size]).per_generation
                              for i in range(0, len(prompts), batch_size)])
        np.testing.assert_allclose(got, expected, rtol=1e-4, err_msg=context)
    assert np.all(expected > 0), tiny.context  # the comparison is not between zeros


def check_epsilon_space(tiny: TinyPipeline, prompts: list[str]) -> None:
    """Epsilon-space scores over a 3-step window are the pipeline's velocity norms times (1 - sigma); at the first step alone, exactly 0."""
    norms = tiny.norms(1, prompts, tiny.last_step)[: tiny.last_step]
    scales = 1.0 - tiny.pipe.scheduler.sigmas.double().numpy()[: tiny.last_step, None]  # set by the pipeline's run
    epsilon = DetectSettings(**{**tiny.settings((0, tiny.last_step), 1).to_dict(), "score_space": "epsilon"})
    got = Scanner(tiny.model, epsilon).score(prompts).per_generation
    expected = (norms * scales).mean(axis=0)[:, None]
    np.testing.assert_allclose(got, expected, rtol=1e-4, err_msg=tiny.context)
    assert np.all(expected > 0), tiny.context
    first = DetectSettings(**{**epsilon.to_dict(), "end_step": 1})
    assert np.all(Scanner(tiny.model, first).score(prompts).per_generation == 0.0), tiny.context


def check_significance(tiny: TinyPipeline, prompt: str) -> None:
    """Explain's first-step gradient significance equals float64 autograd on the pipeline's own transformer call arguments."""
    context = f"{prompt!r}, {tiny.context}"
    got = token_significance(Scanner(tiny.model, tiny.settings((0, 1), 1)), [prompt])
    reference = float64_significance(tiny.pipe.transformer, tiny.step_pairs(tiny.calls(1, [prompt], 1)))
    assert got.shape == (1, len(reference)), context
    np.testing.assert_allclose(got[0], reference, rtol=1e-3, atol=1e-6 * reference.max(), err_msg=context)
    assert reference.max() > 0, context


def check_mitigation(tiny: TinyPipeline, prompt: str) -> None:
    """Embedding optimization (target 0, lr 0.1, 3 steps) lowers the scanner's score; frozen positions stay bit-identical, the rest moves."""
    context = f"{prompt!r}, {tiny.context}"
    scanner = Scanner(tiny.model, tiny.settings((0, 1), 1))
    family = scanner.family
    before = scanner.score([prompt]).score[0]
    with torch.no_grad():
        encoded = family.encode([prompt])
    result = optimize_embedding(
        scanner, prompt, scanner.shared_latents(), MitigationSettings(target=0.0, learning_rate=0.1, max_iterations=3)
    )
    assert result.score_before == pytest.approx(before, rel=1e-4), context
    assert result.iterations == 3 and result.score_after < result.score_before, context
    for key in family.trainable_keys:
        frozen = family.frozen_positions if key == family.sequence_key else 0
        moved, original = result.conditioning[key], encoded[key]
        assert torch.equal(moved[:, :frozen], original[:, :frozen]), f"{key}: a frozen position moved, {context}"
        assert not torch.equal(moved[:, frozen:], original[:, frozen:]), f"{key} did not move, {context}"
