"""Tokenizing through the private Rust tokenizer gives the ids, counts and flags transformers' tokenizer gives."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_families import t5_tokenizer

from scanner.benchmark import sample_prompts
from scanner import encode as encode_module
from scanner.encode import ClipWordIds, PromptTokenizer
from scanner.model import load_model

# Besides caption words: what the CLIP pre-tokenizer splits apart (digits, contractions, punctuation runs,
# special-token text in and out of case), accents, scripts without spaces, emoji, whitespace runs.
PIECES = ["7", "42", "don't", "it's", "!!", "a|b", "|", "<|", "|>>", "<|endoftext|>", "<|ENDOFTEXT|>", "<|startoftext|>",
          "café", "naïve", "東京", "🙂👍🏽", "—", "\t", "\n", "  "]
EDGE_CASES = ["", " ", "¿Qué? café — naïve résumé 東京", "<|endoftext|> hi", "A  B\tC\n", " ".join(["long words"] * 60), "🙂👍🏽"]


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_private_backend_matches_transformers(variant, tiny_sd1, tiny_sd2):
    tokenizer = load_model({"sd1": tiny_sd1, "sd2": tiny_sd2}[variant], device="cpu").tokenizer
    prompts = sample_prompts(200, offset=int(np.random.default_rng().integers(0, 10_000))) + EDGE_CASES
    fast = PromptTokenizer(tokenizer)
    assert fast._rust is not None and fast._unsplit  # CLIP's: GPT-2's regex skipped
    slow = PromptTokenizer(tokenizer)
    slow._rust = None  # the transformers path
    got, expected = fast.tokenize(prompts), slow.tokenize(prompts)
    assert np.array_equal(got.input_ids, expected.input_ids)
    assert (got.n_tokens, got.truncated) == (expected.n_tokens, expected.truncated)
    assert any(got.truncated)


def test_select_keeps_the_order_asked_for(tiny_sd1):
    encoder = PromptTokenizer(load_model(tiny_sd1, device="cpu").tokenizer)
    tokens = encoder.tokenize(["a", "b c", "d e f"])
    picked = tokens.select([2, 0])
    assert np.array_equal(picked.input_ids, tokens.input_ids[[2, 0]]) and picked.n_tokens == [3, 1]
    assert tokens.select(range(3)) is tokens


def random_text(rng: np.random.Generator, count: int) -> list[str]:
    """`count` strings of 1 to 4 code points from anywhere in Unicode but the surrogates, ASCII and Latin more often."""
    ranges = np.array([(0x20, 0x7F), (0xA0, 0x250), (0x300, 0x370), (0x4E00, 0x4F00), (0x1F300, 0x1FB00), (0x80, 0xD800),
                       (0xE000, 0x110000)])
    picks = ranges[rng.choice(len(ranges), size=(count, 4), p=[0.4, 0.15, 0.05, 0.1, 0.1, 0.1, 0.1])]
    codes = rng.integers(picks[..., 0], picks[..., 1])
    return ["".join(map(chr, row[: rng.integers(1, 5)])) for row in codes]


def random_prompts(rng: np.random.Generator, count: int, longest: int) -> list[str]:
    """`count` prompts of 0 to `longest` pieces: caption words, mostly, `PIECES` and random code points, joined by
    one space or none."""
    words = np.array(" ".join(sample_prompts(500)).split())
    prompts = []
    for _ in range(count):
        size = rng.integers(0, longest + 1)
        odd = np.array(PIECES + random_text(rng, 20))
        pieces = np.where(rng.random(size) < 0.2, rng.choice(odd, size), rng.choice(words, size))
        spaces = np.where(rng.random(size) < 0.8, " ", "")
        prompts.append("".join(piece + space for piece, space in zip(pieces, spaces)))
    return prompts


def ascii_prompts(rng: np.random.Generator, count: int, longest: int) -> list[str]:
    """`count` ASCII prompts (what CLIP's word path takes): caption words, contractions, digits, and any ASCII
    character (control characters and every kind of whitespace among them), joined by one space or none."""
    words = [w for w in " ".join(sample_prompts(500)).split() if ClipWordIds.takes(w)] + ["it's", "'LL", "we'VE", "''s", "x'd"]
    characters = [chr(c) for c in range(128) if chr(c) != "|"]
    prompts = []
    for _ in range(count):
        size = rng.integers(0, longest + 1)
        pieces = np.where(rng.random(size) < 0.3, rng.choice(characters, size), rng.choice(words, size))
        spaces = np.where(rng.random(size) < 0.7, " ", "")
        prompts.append("".join(piece + space for piece, space in zip(pieces, spaces)))
    return prompts


@pytest.fixture(scope="module")
def t5():
    words = " ".join(sample_prompts(500)).lower().split()
    return t5_tokenizer(words[: len(words) // 2], max_length=32)  # half the words spelled out: long prompts


@pytest.mark.parametrize("variant", ["sd1", "sd2", "t5"])
def test_random_prompts_as_transformers_pads_counts_and_truncates(variant, tiny_sd1, tiny_sd2, t5):
    """Ids as `tokenizer(..., padding="max_length", truncation=True)`, the untruncated count and the flag, on
    prompts from empty to several times the length, CLIP's (BOS, two pad ids) and T5's (no BOS)."""
    tokenizer = t5 if variant == "t5" else load_model({"sd1": tiny_sd1, "sd2": tiny_sd2}[variant], device="cpu").tokenizer
    length = tokenizer.model_max_length
    rng = np.random.default_rng()
    prompts = random_prompts(rng, 300, longest=3 * length) + ascii_prompts(rng, 300, longest=3 * length) + EDGE_CASES
    encoder = PromptTokenizer(tokenizer)
    assert encoder._unsplit == (variant != "t5")  # T5's Metaspace tokenizer: the copy as it is
    if encoder._unsplit:  # CLIP's: most ASCII prompts take the word path (SD 2's too, its `!` an added token)
        assert encoder._words is not None and encoder._words.singles == ({"!": [0]} if variant == "sd2" else {})
        assert 300 <= sum(map(ClipWordIds.takes, prompts)) < len(prompts)
    got = encoder.tokenize(prompts)
    expected = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="np")
    assert np.array_equal(got.input_ids, expected.input_ids)
    counts = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False).input_ids]
    assert got.n_tokens == counts
    assert got.truncated == [n + tokenizer.num_special_tokens_to_add() > length for n in counts]
    assert 0 < sum(got.truncated) < len(prompts)


def test_rows_are_views_of_the_batch(tiny_sd1):
    tokens = PromptTokenizer(load_model(tiny_sd1, device="cpu").tokenizer).tokenize(["a", "b c", "d e f"])
    part = tokens.rows(1, 3)
    assert np.shares_memory(part.input_ids, tokens.input_ids) and np.array_equal(part.input_ids, tokens.input_ids[1:])
    assert (part.n_tokens, part.truncated) == ([2, 3], [False, False])


@pytest.mark.parametrize("bound", ["WORD_CACHE_SIZE", "WORD_CACHE_CHARS"])
def test_the_word_cache_stays_bounded_and_right(tiny_sd1, monkeypatch, bound):
    """Past `WORD_CACHE_SIZE` words or `WORD_CACHE_CHARS` characters the cache starts again: memory stays flat
    over a long log, ids stay right."""
    monkeypatch.setattr(encode_module, bound, 50)
    tokenizer = load_model(tiny_sd1, device="cpu").tokenizer
    encoder = PromptTokenizer(tokenizer)
    prompts = ascii_prompts(np.random.default_rng(), 200, longest=12)
    got = encoder.tokenize(prompts)
    words = encoder._words
    assert 0 < len(words) <= 50 and words.chars == sum(map(len, words))
    assert bound == "WORD_CACHE_SIZE" or words.chars <= 50
    assert got.n_tokens == [len(ids) for ids in tokenizer(prompts, add_special_tokens=False).input_ids]
    expected = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="np")
    assert np.array_equal(got.input_ids, expected.input_ids)


def test_added_tokens_keep_their_ids(tiny_sd1):
    """A textual inversion's tokens are matched whole before CLIP's split: such a tokenizer skips the word path."""
    tokenizer = load_model(tiny_sd1, device="cpu").tokenizer
    tokenizer.add_tokens(["<cat-toy>", "sks dog"])
    encoder = PromptTokenizer(tokenizer)
    assert encoder._unsplit and encoder._words is None
    prompts = ["a photo of <cat-toy>", "sks dog on a beach", "<CAT-TOY> and sks  dog"] + ascii_prompts(
        np.random.default_rng(), 50, longest=20)
    expected = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="np")
    assert np.array_equal(encoder.tokenize(prompts).input_ids, expected.input_ids)
    assert len(set(tokenizer.convert_tokens_to_ids(["<cat-toy>", "sks dog"])) & set(expected.input_ids.flatten().tolist())) == 2
