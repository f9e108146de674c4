"""Prompt -> padded token ids, exactly as diffusers' pipelines tokenize (`padding="max_length"`, truncation).

One `PromptTokenizer` per tokenizer of a pipeline (CLIP's BPE, T5's sentencepiece); a family
joins them and runs its text encoders on the ids (`scanner.families`).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np


@dataclass
class TokenizedPrompts:
    """Padded ids `[B, L]` per tokenizer (by folder name), the untruncated token counts, truncation flags.

    Counts and flags are the primary tokenizer's: the one whose positions make up the sequence
    that explain and mitigation work on. The ids are int64 numpy arrays (torch tensors once `pinned`):
    tokenizing, and a scan served by a plan, need no torch; the families take them with `torch.as_tensor`
    (no copy).
    """

    ids: dict[str, Any]  # np.ndarray, or a pinned torch.Tensor
    n_tokens: list[int]
    truncated: list[bool]

    def rows(self, start: int, stop: int) -> TokenizedPrompts:
        """The prompts at positions `[start, stop)`: views of the ids, nothing copied."""
        ids = {name: t[start:stop] for name, t in self.ids.items()}
        return TokenizedPrompts(ids, self.n_tokens[start:stop], self.truncated[start:stop])

    def pinned(self) -> TokenizedPrompts:
        """These prompts with their ids in pinned host memory: copied to a CUDA device without a sync."""
        import torch

        ids = {name: torch.as_tensor(t).pin_memory() for name, t in self.ids.items()}
        return TokenizedPrompts(ids, self.n_tokens, self.truncated)

    @property
    def input_ids(self) -> Any:
        """The primary tokenizer's ids `[B, L]`."""
        return next(iter(self.ids.values()))

    def select(self, rows: Sequence[int]) -> TokenizedPrompts:
        """The prompts at positions `rows`, in that order."""
        rows = list(rows)
        if rows == list(range(len(self.n_tokens))):
            return self
        index = np.asarray(rows, dtype=np.int64)
        ids = {name: _take(t, index) for name, t in self.ids.items()}
        return TokenizedPrompts(ids, [self.n_tokens[i] for i in rows], [self.truncated[i] for i in rows])


def _take(ids: Any, index: np.ndarray) -> Any:
    """Rows `index` of a numpy array or a torch tensor."""
    if isinstance(ids, np.ndarray):
        return ids[index]
    import torch

    # index_select: indexing with a Python list takes milliseconds in torch 2.13.
    return ids.index_select(0, torch.from_numpy(index))


def tokenize_with(tokenizers: Mapping[str, PromptTokenizer], prompts: Sequence[str]) -> TokenizedPrompts:
    """Every tokenizer's padded ids of `prompts`; token counts and truncation from the primary (first) one."""
    each = [tokenizer.tokenize(prompts) for tokenizer in tokenizers.values()]
    ids = {name: t for tokens in each for name, t in tokens.ids.items()}
    return TokenizedPrompts(ids, each[0].n_tokens, each[0].truncated)


def _private_copy(backend):
    """A copy of a fast tokenizer's Rust tokenizer, without truncation, padding or post-processing.

    Its `encode_batch` releases the GIL, so tokenizing in a background thread overlaps with
    the model's thread; a private copy is never reconfigured by calls through the tokenizer.
    """
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy


# CLIP's normalizer and pre-tokenizer, as transformers' CLIPTokenizer builds them.
_CLIP_NORMALIZER = {"type": "Sequence", "normalizers": [
    {"type": "NFC"}, {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "}, {"type": "Lowercase"},
]}
_CLIP_SPLIT = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
_CLIP_PRE_TOKENIZER = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": _CLIP_SPLIT}, "behavior": "Removed", "invert": True},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
]}


def _is_clip(backend) -> bool:
    """Whether a Rust tokenizer normalizes and pre-tokenizes as CLIP's (those two parts read alone, not the vocabulary)."""
    def state(part) -> dict | None:
        return None if part is None else json.loads(part.__getstate__())

    return state(backend.normalizer) == _CLIP_NORMALIZER and state(backend.pre_tokenizer) == _CLIP_PRE_TOKENIZER


def _skip_gpt2_regex(clip) -> None:
    """Make a copy of CLIP's Rust tokenizer skip GPT-2's regex in its ByteLevel step.

    Each piece CLIP's Split keeps is a contraction, a run of letters, one digit or a run of other
    non-space characters, and GPT-2's regex matches each of these whole: skipping it changes no id
    and saves a third of the Rust call. The exception is the special-token text among the Split's
    alternatives (`<|endoftext|>` in another case, which the added tokens do not take out first):
    GPT-2's regex splits it in three. It needs a `|`, which CLIP's normalizer creates from no other
    character, so prompts with one are tokenized by an exact copy (`PromptTokenizer._encode`).
    """
    from tokenizers import Regex, pre_tokenizers

    clip.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])


# `_CLIP_SPLIT` on lowercased ASCII text. Its `\s` is Unicode's White_Space, which in ASCII is these
# six characters (Python's `\s` adds \x1c-\x1f); the normalizer's `\s+` -> " " only joins what the
# split drops, so it needs no step here.
_CLIP_ASCII_SPACE = r"\t\n\x0b\x0c\r "
_CLIP_ASCII_PIECES = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "[a-z]+", "[0-9]"]
# What `ClipWordIds` keeps before it starts again: the vocabulary of a prompt log, in words and in their
# characters (a log of long random "words" must not grow it without bound; a prompt may be 10,000 characters).
WORD_CACHE_SIZE = 1 << 16
WORD_CACHE_CHARS = 1 << 20


class ClipWordIds(dict):
    """CLIP's ids of ASCII prompts without a Rust call per prompt: split as CLIP's pre-tokenizer does, and
    each word's BPE ids looked up (the Rust tokenizer encodes a word the first time it is seen).

    BPE works on each piece of the split alone, so a prompt's ids are its pieces' ids joined. On ASCII,
    CLIP's NFC step changes nothing and its lowercasing is `str.lower`. A `|` can start special-token text,
    which the Rust tokenizer matches before splitting: those prompts, like non-ASCII ones, stay with it.
    Added tokens are matched whole before the split too: a single punctuation character (SD 2's pad token
    `!`) becomes a piece of its own with its id; any other (a textual inversion's `<cat-toy>`) leaves the
    tokenizer to Rust (`for_tokenizer`). A caption costs 8-12 us here against 58-70 us of CPU in the Rust
    call (bench/RESULTS.md).
    """

    def __init__(self, rust, singles: dict[str, int]):
        super().__init__()
        self.rust = rust
        self.singles = {c: [i] for c, i in singles.items()}  # added one-character tokens and their ids
        own = "".join(re.escape(c) for c in singles)
        self.split = re.compile("|".join([*map(re.escape, singles), *_CLIP_ASCII_PIECES,
                                          f"[^{_CLIP_ASCII_SPACE}a-z0-9{own}]+"]))
        self.chars = 0
        self.update(self.singles)

    @classmethod
    def for_tokenizer(cls, rust) -> ClipWordIds | None:
        """The word path of a CLIP Rust tokenizer, or None where an added token could occur in a prompt it
        takes other than as a punctuation character of its own."""
        singles = {}
        for i, token in rust.get_added_tokens_decoder().items():
            content = token.content
            if not cls.takes(content):
                continue  # never inside a prompt this takes
            if len(content) != 1 or content.isalnum() or content.isspace() or content == "'" or not token.special:
                return None
            singles[content] = i
        return cls(rust, singles)

    def __missing__(self, word: str) -> list[int]:
        if len(self) >= WORD_CACHE_SIZE or self.chars + len(word) > WORD_CACHE_CHARS:
            self.clear()
            self.update(self.singles)
            self.chars = 0
        ids = self[word] = self.rust.encode(word, add_special_tokens=False).ids
        self.chars += len(word)
        return ids

    @staticmethod
    def takes(prompt: str) -> bool:
        """Whether `prompt` is tokenized here: ASCII without a `|`."""
        return prompt.isascii() and "|" not in prompt

    def ids(self, prompt: str) -> list[int]:
        """`prompt`'s ids without special tokens (`takes(prompt)` must hold)."""
        return list(chain.from_iterable(map(self.__getitem__, self.split.findall(prompt.lower()))))


def _ids(backend, prompts: list[str]) -> list[list[int]]:
    """Each prompt's ids from a Rust tokenizer, without special tokens."""
    # encode_batch_fast, where the installed tokenizers has it, skips the offsets (unused here).
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [e.ids for e in encode(prompts, add_special_tokens=False)]


class PromptTokenizer:
    """Tokenize as a pipeline does: `[BOS] + tokens[:keep] + [EOS]`, padded to `max_length`.

    CLIP tokenizers have a BOS token, T5's has none; either way one pass without special
    tokens gives the ids and the true length, and the special tokens are added here, which is
    what `tokenizer(..., padding="max_length", truncation=True)` produces.
    """

    def __init__(self, tokenizer, name: str = "tokenizer", max_length: int | None = None):
        self.tokenizer = tokenizer
        self.name = name
        self.max_length = max_length or tokenizer.model_max_length
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.keep = self.max_length - len(self.bos) - 1
        backend = getattr(tokenizer, "backend_tokenizer", None)  # None: a slow tokenizer, through transformers
        self._rust = None if backend is None else _private_copy(backend)
        self._unsplit = backend is not None and _is_clip(backend)
        self._words: ClipWordIds | None = None
        if self._unsplit:
            _skip_gpt2_regex(self._rust)
            self._words = ClipWordIds.for_tokenizer(self._rust)

    def tokenize(self, prompts: Sequence[str]) -> TokenizedPrompts:
        """Padded ids `[B, max_length]` (under this tokenizer's name), untruncated counts, truncation flags."""
        content = self._encode(list(prompts))
        counts = np.fromiter(map(len, content), dtype=np.int64, count=len(content))
        ids = self._padded(content, counts)
        return TokenizedPrompts({self.name: ids}, counts.tolist(), (counts > self.keep).tolist())

    def _encode(self, prompts: list[str]) -> list[list[int]]:
        """Each prompt's ids without special tokens: the Rust tokenizer's, without transformers' per-row Python work."""
        if self._rust is None:
            return self.tokenizer(prompts, add_special_tokens=False, verbose=False).input_ids
        if not self._unsplit:
            return _ids(self._rust, prompts)
        words = self._words
        content = [words.ids(p) if words is not None and words.takes(p) else None for p in prompts]
        rest = [i for i, ids in enumerate(content) if ids is None]
        # GPT-2's regex matters only to prompts with a `|` (see _skip_gpt2_regex): those take the exact copy.
        for exact in (False, True):
            picked = [i for i in rest if ("|" in prompts[i]) == exact]
            if picked:
                backend = self._exact if exact else self._rust
                for i, ids in zip(picked, _ids(backend, [prompts[i] for i in picked])):
                    content[i] = ids
        return content

    @functools.cached_property
    def _exact(self):
        """The Rust tokenizer as it is, for the prompts GPT-2's regex matters to: made on first use (rare)."""
        return _private_copy(self.tokenizer.backend_tokenizer)

    def _padded(self, content: list[list[int]], counts: np.ndarray) -> np.ndarray:
        """`[B, max_length]`: BOS, each row's first `keep` ids, EOS, then padding, filled in whole-array steps
        (built row by row in Python, with `torch.tensor` over the lists, it was a quarter of `tokenize`'s time)."""
        tok = self.tokenizer
        ids = np.full((len(content), self.max_length), tok.pad_token_id, dtype=np.int64)
        ids[:, : len(self.bos)] = self.bos
        kept = np.minimum(counts, self.keep)
        flat = np.fromiter(chain.from_iterable(content), dtype=np.int64, count=int(counts.sum()))
        columns = np.arange(self.keep)
        inside = columns < kept[:, None]
        starts = np.cumsum(counts) - counts
        ids[:, len(self.bos) : len(self.bos) + self.keep][inside] = flat[(starts[:, None] + columns)[inside]]
        ids[np.arange(len(content)), len(self.bos) + kept] = tok.eos_token_id
        return ids

    def attention_mask(self, ids: Any) -> Any:
        """`[B, L]` long tensor (of a torch tensor of ids): 1 up to and including the first EOS, 0 on the padding
        after it (the tokenizer's own mask).

        Found from the EOS rather than the pad id, since CLIP tokenizers may pad with EOS itself.
        """
        eos = (ids == self.tokenizer.eos_token_id).long()
        return (eos.cumsum(dim=1) - eos == 0).long()
