"""Flux (`FluxPipeline`): memscan against diffusers' own pipeline on its true-CFG path.

The pipeline runs unmodified with `negative_prompt=""` and `true_cfg_scale`, so that it calls
its transformer on the prompt and then on the empty prompt at each step (the distilled
guidance embedding at its default); a forward hook records both. Flux's default image is 4096
packed latent tokens, so each case scores as few prompts as it needs, and the conditioning of
every prompt is checked against the pipeline's encoder instead of through the transformer.
"""

from __future__ import annotations

import random

import pytest
import torch
from tiny_families import one_thread  # noqa: F401 (an autouse fixture)
from tiny_families_flow import (
    PROMPTS,
    TinyPipeline,
    check_epsilon_space,
    check_mitigation,
    check_parity,
    check_significance,
)

from scanner.model import load_model

SEED = random.randrange(2**31)  # fresh latents each run, shown in the messages
GUIDANCE = random.uniform(2.0, 6.0)  # the true-CFG scale: shapes every step after the first
FEW = [PROMPTS[0], PROMPTS[4]]  # an ordinary and an over-length prompt
DUPLICATE = [*FEW, PROMPTS[3]]  # and the first one's duplicate


class TinyFlux(TinyPipeline):
    """A tiny Flux model and its `FluxPipeline`."""

    calls_per_step = 2  # the prompt's, then the negative prompt's

    def latent_shape(self) -> tuple[int, int, int]:
        """The pipeline's default: `default_sample_size * vae_scale_factor` pixels, 2 x 2 patches of latents."""
        height = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        side = 2 * (height // (self.pipe.vae_scale_factor * 2))
        return (self.pipe.transformer.config.in_channels // 4, side, side)

    def pipeline_latents(self, latents):
        """Packed, as the pipeline takes them."""
        return self.pipe._pack_latents(latents, *latents.shape)

    def extra_call(self, prompts: list[str]) -> dict:
        """The true-CFG path against the empty prompt (one per prompt: a single "" makes too few rows for a batch)."""
        return {"negative_prompt": [""] * len(prompts), "true_cfg_scale": self.guidance}

    def step_pairs(self, calls):
        """Two calls per step: the prompt's, then the negative prompt's."""
        return [(calls[i], calls[i + 1]) for i in range(0, len(calls), 2)]


@pytest.fixture(scope="module")
def tiny(tiny_family) -> TinyFlux:
    from diffusers import FluxPipeline

    path = tiny_family("flux")
    pipe = FluxPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return TinyFlux(load_model(path, device="cpu"), pipe, SEED, GUIDANCE, "flux")


@pytest.mark.parametrize(
    "window, generations, batch_sizes, prompts",
    [
        ((0, 1), 1, (1, 7), DUPLICATE),
        ((0, 1), 4, (1,), FEW[:1]),
        ((0, 3), 1, (1,), FEW[:1]),
        # Every prompt through the transformer: the first case's batching and test_encoding_is_the_pipelines's
        # conditioning of every prompt together cover it.
        pytest.param((0, 1), 1, (7,), PROMPTS, marks=pytest.mark.slow),
    ],
    ids=["first-b1-b7", "first-n4", "window3", "first-all-prompts"],
)
def test_scores_match_diffusers_pipeline(tiny, window, generations, batch_sizes, prompts):
    check_parity(tiny, window, generations, batch_sizes, prompts)


def test_encoding_is_the_pipelines(tiny):
    """Every prompt's T5 sequence and pooled CLIP embedding as the pipeline's encode_prompt returns them."""
    with torch.no_grad():  # as the pipeline's call runs it (attention kernels differ with autograd on)
        embeds, pooled, _ = tiny.pipe.encode_prompt(PROMPTS, prompt_2=None)
        cond = tiny.model.family.encode(PROMPTS)
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds, rtol=0, atol=1e-6, msg=lambda m: f"{m}\n{tiny.context}")
    torch.testing.assert_close(cond["pooled_projections"], pooled, rtol=0, atol=1e-6, msg=lambda m: f"{m}\n{tiny.context}")


def test_epsilon_space_and_token_counts(tiny):
    """Epsilon scores are (1 - sigma) times the velocity's (0 at sigma = 1); counts and truncation are T5's."""
    check_epsilon_space(tiny, FEW[:1])  # window3's pipeline run
    tokens = tiny.model.family.tokenize(FEW)
    expected = [len(tiny.pipe.tokenizer_2(p, add_special_tokens=False).input_ids) for p in FEW]
    assert tokens.n_tokens == expected and tokens.truncated == [n > 511 for n in expected] == [False, True]


def test_gradient_significance_matches_float64_autograd(tiny):
    """Explain's gradient over T5's sequence, against autograd on the pipeline's own call arguments in float64."""
    check_significance(tiny, random.choice(PROMPTS))


def test_mitigation_lowers_the_score(tiny):
    check_mitigation(tiny, random.choice(PROMPTS))
