"""Prompt encoding: tokenization alone (per batch size), and tokenization + an SD 1.5-shaped CLIP text encoder.

    python -m pytest bench/bench_encoding.py --benchmark-enable -n 0
"""

from __future__ import annotations

import pytest
import torch

from scanner.benchmark import SD15_TEXT_ENCODER, clip_tokenizer, sample_prompts
from scanner.encode import PromptTokenizer

BATCH = 64


@pytest.fixture(scope="module")
def tokenizer() -> PromptTokenizer:
    return PromptTokenizer(clip_tokenizer())


@pytest.fixture(scope="module")
def text_encoder() -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER)).eval().requires_grad_(False)


@pytest.mark.parametrize("batch", [16, BATCH, 1024])  # 16: `memscan scan`'s default batch
def test_tokenize(benchmark, tokenizer, batch):
    benchmark.group = "tokenization"
    result = benchmark(tokenizer.tokenize, sample_prompts(batch))
    assert result.input_ids.shape == (batch, 77)


def test_tokenize_and_encode(benchmark, tokenizer, text_encoder):
    benchmark.group = f"prompt encoding, {BATCH} prompts"
    prompts = sample_prompts(BATCH)
    with torch.inference_mode():
        result = benchmark(lambda: text_encoder(torch.as_tensor(tokenizer.tokenize(prompts).input_ids))[0])
    assert result.shape == (BATCH, 77, SD15_TEXT_ENCODER["hidden_size"])
