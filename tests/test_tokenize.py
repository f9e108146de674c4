"""Tokenizing through the private Rust tokenizer gives the ids transformers' tokenizer gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scanner.benchmark import sample_prompts
from scanner.encode import PromptTokenizer
from scanner.model import load_model

EDGE_CASES = ["", " ", "¿Qué? café — naïve résumé 東京", "<|endoftext|> hi", "A  B\tC\n", " ".join(["long words"] * 60), "🙂👍🏽"]


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_private_backend_matches_transformers(variant, tiny_sd1, tiny_sd2):
    tokenizer = load_model({"sd1": tiny_sd1, "sd2": tiny_sd2}[variant], device="cpu").tokenizer
    prompts = sample_prompts(200, offset=int(np.random.default_rng().integers(0, 10_000))) + EDGE_CASES
    fast = PromptTokenizer(tokenizer)
    assert fast._backend is not None
    slow = PromptTokenizer(tokenizer)
    slow._backend = None  # the transformers path
    got, expected = fast.tokenize(prompts), slow.tokenize(prompts)
    assert torch.equal(got.input_ids, expected.input_ids)
    assert (got.n_tokens, got.truncated) == (expected.n_tokens, expected.truncated)
    assert any(got.truncated)


def test_select_keeps_the_order_asked_for(tiny_sd1):
    encoder = PromptTokenizer(load_model(tiny_sd1, device="cpu").tokenizer)
    tokens = encoder.tokenize(["a", "b c", "d e f"])
    picked = tokens.select([2, 0])
    assert torch.equal(picked.input_ids, tokens.input_ids[[2, 0]]) and picked.n_tokens == [3, 1]
    assert tokens.select(range(3)) is tokens
