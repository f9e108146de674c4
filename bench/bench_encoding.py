"""Prompt encoding: tokenization alone, and tokenization + an SD 1.5-shaped CLIP text encoder.

    python -m pytest bench/bench_encoding.py --benchmark-enable
"""

from __future__ import annotations

import pytest
import torch

from scanner.benchmark import SD15_TEXT_ENCODER, clip_tokenizer, sample_prompts
from scanner.encode import PromptEncoder

BATCH = 64


@pytest.fixture(scope="module")
def encoder() -> PromptEncoder:
    from transformers import CLIPTextConfig, CLIPTextModel

    text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER)).eval().requires_grad_(False)
    return PromptEncoder(clip_tokenizer(), text_encoder)


def test_tokenize(benchmark, encoder):
    benchmark.group = f"prompt encoding, {BATCH} prompts"
    prompts = sample_prompts(BATCH)
    result = benchmark(encoder.tokenize, prompts)
    assert result.input_ids.shape == (BATCH, 77)


def test_tokenize_and_encode(benchmark, encoder):
    benchmark.group = f"prompt encoding, {BATCH} prompts"
    prompts = sample_prompts(BATCH)
    with torch.inference_mode():
        result = benchmark(encoder.encode, prompts)
    assert result.conditioning["encoder_hidden_states"]s.shape == (BATCH, 77, SD15_TEXT_ENCODER["hidden_size"])
