"""PixArt-α/Σ (`PixArtAlphaPipeline`, `PixArtSigmaPipeline`): memscan against diffusers' own pipelines on tiny random models.

The T5 tokenizer is built locally (tests/tiny_families.py). Scores, explain's gradient
and generation are checked against the unmodified pipeline's transformer calls, of which the
score takes the epsilon half of the learned-sigma output.
"""

from __future__ import annotations

import random

import pytest
import torch
from tiny_families import one_thread  # noqa: F401 (an autouse fixture)
from tiny_families_diffusion import (
    PROMPTS,
    PipelineNorms,
    as_float64,
    assert_generation_matches_prompts,
    assert_gradient_matches,
    assert_mitigation_lowers_score,
    assert_scores_match,
    build_tiny_pixart,
    load_pipeline,
)

from scanner.model import load_model

# What the pipeline call needs besides the prompt: no caption cleaning (memscan's choice; the
# pipelines fall back to it without bs4 and ftfy), and no resolution binning (the tiny sample
# sizes have no bin table; the default size is its own bin at the real ones).
CALL = {"clean_caption": False, "use_resolution_binning": False}


def _epsilon(out: torch.Tensor) -> torch.Tensor:
    return out[:, :4]  # the first 4 of 8 channels: epsilon, then the learned variance


def _pipeline(path, dtype: torch.dtype = torch.float32):
    from diffusers import DiffusionPipeline

    return load_pipeline(DiffusionPipeline, path, dtype)  # the class model_index.json names, α or Σ


@pytest.fixture(scope="module")
def alpha_dir(tiny_family):
    return tiny_family("pixart")


@pytest.fixture(scope="module")
def alpha(alpha_dir):
    return load_model(alpha_dir, device="cpu")


@pytest.fixture(scope="module")
def norms(alpha_dir):
    pipe = _pipeline(alpha_dir)
    return PipelineNorms(pipe, pipe.transformer, _epsilon, (4, 8, 8), random.randrange(2**31), **CALL)


@pytest.mark.parametrize("window, generations", [((0, 1), 1), ((0, 1), 4), ((1, 4), 4)])
def test_scores_match_diffusers_pipeline(alpha, norms, window, generations):
    assert_scores_match(alpha, norms, window, generations)


@pytest.mark.parametrize("variant, sample_size, patch_size", [("sigma", 8, 2), ("alpha", 128, 8)])
def test_first_step_scores_of_sigma_and_of_alpha_1024(tmp_path, variant, sample_size, patch_size):
    """Σ: 300 T5 tokens. α at sample size 128: conditioned on the default size's resolution and aspect ratio."""
    path = build_tiny_pixart(tmp_path / f"tiny-pixart-{variant}", variant, sample_size, patch_size)
    model = load_model(path, device="cpu")
    assert model.family.tokenizer.max_length == (300 if variant == "sigma" else 120)
    assert model.family.denoiser.use_additional_conditions == (sample_size == 128)
    pipe = _pipeline(path)
    seed = random.randrange(2**31)
    norms = PipelineNorms(pipe, pipe.transformer, _epsilon, (4, sample_size, sample_size), seed, steps=1, **CALL)
    assert_scores_match(model, norms, (0, 1), 1)


def test_encoding_is_the_pipelines(alpha, norms):
    """Prompts lowercased and stripped, T5 with its mask, "" at the same length, as encode_prompt returns them."""
    family = alpha.family
    with torch.no_grad():  # as the pipeline's call runs it (attention kernels differ with autograd on)
        embeds, mask, negative, negative_mask = norms.pipe.encode_prompt(PROMPTS, clean_caption=False)
        cond, uncond = family.encode(PROMPTS), family.unconditional()
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds, rtol=0, atol=1e-6)
    assert torch.equal(cond["encoder_attention_mask"], mask) and cond["encoder_attention_mask"].dtype == torch.int64
    torch.testing.assert_close(uncond["encoder_hidden_states"], negative[:1], rtol=0, atol=1e-6)
    assert torch.equal(uncond["encoder_attention_mask"], negative_mask[:1])
    tokens = family.tokenize(PROMPTS)
    assert tokens.truncated == [n > 119 for n in tokens.n_tokens] and tokens.truncated[4]  # 119 kept, then </s>


def test_gradient_matches_float64_autograd(alpha_dir):
    """token_significance against the pipeline's own transformer calls differentiated in float64, two steps after the first."""
    pipe64 = _pipeline(alpha_dir, torch.float64)
    assert_gradient_matches(as_float64(load_model(alpha_dir, device="cpu")), pipe64, pipe64.transformer, _epsilon, (1, 3), 1,
                            **CALL)


def test_mitigation_lowers_the_score(alpha):
    assert_mitigation_lowers_score(alpha, "Mothers influence on her young hippo")


def test_generation_from_memscan_conditioning(alpha):
    assert_generation_matches_prompts(alpha, **CALL)
