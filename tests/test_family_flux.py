"""Flux (`FluxPipeline`): memscan against diffusers' own pipeline on its true-CFG path.

The pipeline runs unmodified with `negative_prompt=""` and `true_cfg_scale`, so that it calls
its transformer on the prompt and then on the empty prompt at each step (the distilled
guidance embedding at its default); a forward hook records both. Flux's default image is 4096
packed latent tokens, so the larger cases score fewer prompts.
"""

from __future__ import annotations

import random

import pytest
from tiny_families_flow import (
    PROMPTS,
    TinyPipeline,
    build_tiny_flux,
    check_epsilon_space,
    check_mitigation,
    check_parity,
    check_significance,
    float64_significance,
)

from scanner.model import load_model

SEED = random.randrange(2**31)  # fresh latents each run, shown in the messages
GUIDANCE = random.uniform(2.0, 6.0)  # the true-CFG scale: shapes every step after the first
FEW = [PROMPTS[0], PROMPTS[4]]  # an ordinary and an over-length prompt


class TinyFlux(TinyPipeline):
    """A tiny Flux model and its `FluxPipeline`."""

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

    def step_outputs(self, calls):
        """Two calls per step: the prompt's, then the negative prompt's."""
        return [(calls[i][1], calls[i + 1][1]) for i in range(0, len(calls), 2)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyFlux:
    from diffusers import FluxPipeline

    path = build_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux")
    pipe = FluxPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return TinyFlux(load_model(path, device="cpu"), pipe, SEED, GUIDANCE, "flux")


@pytest.mark.parametrize(
    "window, generations, batch_size, prompts",
    [((0, 1), 1, 7, PROMPTS), ((0, 1), 1, 1, FEW), ((0, 1), 4, 1, FEW[:1]), ((0, 3), 1, 1, FEW)],
    ids=["first-n1-b7", "first-n1-b1", "first-n4", "window3"],
)
def test_scores_match_diffusers_pipeline(tiny, window, generations, batch_size, prompts):
    check_parity(tiny, window, generations, batch_size, prompts)


def test_epsilon_space_and_token_counts(tiny):
    """Epsilon scores are (1 - sigma) times the velocity's (0 at sigma = 1); counts and truncation are T5's."""
    check_epsilon_space(tiny, FEW)
    tokens = tiny.model.family.tokenize(FEW)
    expected = [len(tiny.pipe.tokenizer_2(p, add_special_tokens=False).input_ids) for p in FEW]
    assert tokens.n_tokens == expected and tokens.truncated == [n > 511 for n in expected] == [False, True]


def test_gradient_significance_matches_float64_autograd(tiny):
    """Explain's gradient over T5's sequence, against autograd on the pipeline's own call arguments in float64."""
    prompt = random.choice(PROMPTS)
    (cond, _), (uncond, _) = tiny.calls(1, [prompt], 1)
    check_significance(tiny, float64_significance(tiny.pipe.transformer, cond, uncond), prompt)


def test_mitigation_lowers_the_score(tiny):
    check_mitigation(tiny, random.choice(PROMPTS))
