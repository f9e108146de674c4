"""SDXL (`StableDiffusionXLPipeline`): memscan against diffusers' own pipeline on a tiny random model.

Scores, explain's gradient and generation are checked against the unmodified pipeline's UNet
calls (tests/tiny_families_diffusion.py); the refiner is refused.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from tiny_families import one_thread  # noqa: F401 (an autouse fixture)
from tiny_families_diffusion import (
    PipelineNorms,
    as_float64,
    assert_generation_matches_prompts,
    assert_gradient_matches,
    assert_mitigation_lowers_score,
    assert_scores_match,
    load_pipeline,
)

from scanner.errors import MemscanError
from scanner.model import load_model


def _epsilon(out: torch.Tensor) -> torch.Tensor:
    return out  # the UNet predicts epsilon


@pytest.fixture(scope="module")
def sdxl_dir(tiny_family) -> Path:
    return tiny_family("sdxl")


def _sdxl_norms(path: Path, seed: int, steps: int | None = None) -> PipelineNorms:
    from diffusers import StableDiffusionXLPipeline

    pipe = load_pipeline(StableDiffusionXLPipeline, path)
    extra = {} if steps is None else {"steps": steps}
    return PipelineNorms(pipe, pipe.unet, _epsilon, (4, 8, 8), seed, **extra)


@pytest.fixture(scope="module")
def norms(sdxl_dir):
    return _sdxl_norms(sdxl_dir, random.randrange(2**31))


@pytest.mark.parametrize("window, generations", [((0, 1), 1), ((0, 1), 4), ((1, 4), 4)])
def test_scores_match_diffusers_pipeline(sdxl_dir, norms, window, generations):
    assert_scores_match(load_model(sdxl_dir, device="cpu"), norms, window, generations)


def test_unconditional_branch_as_the_pipeline_builds_it(sdxl_dir, tmp_path):
    """force_zeros_for_empty_prompt (the default): zeros for both entries; without it, the encoding of ""."""
    uncond = load_model(sdxl_dir, device="cpu").family.unconditional()
    assert set(uncond) == {"encoder_hidden_states", "text_embeds"}
    assert all(v.abs().max() == 0 for v in uncond.values())
    encoded = tmp_path / "sdxl-encoded-empty"
    shutil.copytree(sdxl_dir, encoded)
    index = json.loads((encoded / "model_index.json").read_text())
    (encoded / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    model = load_model(encoded, device="cpu")
    torch.testing.assert_close(model.family.unconditional(), model.family.encode([""]), rtol=0, atol=0)
    assert model.family.unconditional()["text_embeds"].abs().max() > 0
    assert_scores_match(model, _sdxl_norms(encoded, random.randrange(2**31), steps=1), (0, 1), 1)


def test_gradient_matches_float64_autograd_through_both_encoders(sdxl_dir):
    """token_significance against the pipeline's own UNet calls differentiated in float64, on a 2-step window after the first."""
    from diffusers import StableDiffusionXLPipeline

    pipe64 = load_pipeline(StableDiffusionXLPipeline, sdxl_dir, torch.float64)
    assert_gradient_matches(as_float64(load_model(sdxl_dir, device="cpu")), pipe64, pipe64.unet, _epsilon, (1, 3), 2)


def test_mitigation_lowers_the_score_and_keeps_bos(sdxl_dir):
    """The token embeddings and the pooled one move; BOS stays bit-identical."""
    assert_mitigation_lowers_score(load_model(sdxl_dir, device="cpu"), "The No Limits Business Woman Podcast")


def test_generation_from_memscan_conditioning(sdxl_dir):
    assert_generation_matches_prompts(load_model(sdxl_dir, device="cpu"))


REFINER_INDEX = {
    "_class_name": "StableDiffusionXLImg2ImgPipeline",
    "requires_aesthetics_score": True,
    "force_zeros_for_empty_prompt": False,
    "text_encoder": [None, None],
    "tokenizer": [None, None],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "vae": ["diffusers", "AutoencoderKL"],
}


@pytest.mark.parametrize("changes, reason", [
    ({}, "StableDiffusionXLImg2ImgPipeline is not supported: image-to-image"),
    ({"_class_name": "StableDiffusionXLPipeline"}, "SDXL refiner \\(requires_aesthetics_score\\)"),
    ({"_class_name": "StableDiffusionXLPipeline", "requires_aesthetics_score": False}, "only text_encoder_2 is present"),
])
def test_refiner_is_refused_with_the_reason(sdxl_dir, tmp_path, changes, reason):
    folder = tmp_path / "refiner"
    shutil.copytree(sdxl_dir, folder, ignore=shutil.ignore_patterns("text_encoder", "tokenizer"))
    (folder / "model_index.json").write_text(json.dumps({**REFINER_INDEX, **changes}))
    with pytest.raises(MemscanError, match=reason) as refused:
        load_model(folder, device="cpu")
    assert "\n" not in str(refused.value)
