"""Prompt -> text-encoder output, tokenized exactly as `StableDiffusionPipeline` does."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class TokenizedPrompts:
    """Padded ids `[B, max_length]`, the untruncated prompt-token counts, truncation flags."""

    input_ids: torch.Tensor
    n_tokens: list[int]
    truncated: list[bool]

    def select(self, rows: Sequence[int]) -> TokenizedPrompts:
        """The prompts at positions `rows`, in that order."""
        rows = list(rows)
        if rows == list(range(len(self.n_tokens))):
            return self
        # index_select: indexing with a Python list takes milliseconds in torch 2.13.
        ids = self.input_ids.index_select(0, torch.tensor(rows, dtype=torch.long))
        return TokenizedPrompts(ids, [self.n_tokens[i] for i in rows], [self.truncated[i] for i in rows])


@dataclass
class EncodedPrompts:
    """Text-encoder outputs `[B, L, D]` with each prompt's token count and truncation."""

    embeddings: torch.Tensor
    input_ids: torch.Tensor
    n_tokens: list[int]
    truncated: list[bool]


def _private_backend(tokenizer):
    """A copy of a fast tokenizer's Rust tokenizer, without truncation or padding, or None.

    Its `encode_batch` releases the GIL, so tokenizing in a background thread overlaps with
    the model's thread; a private copy is never reconfigured by calls through `tokenizer`.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy


class PromptEncoder:
    """Tokenize (pad to `model_max_length`, truncate longer prompts) and encode in one batch."""

    def __init__(self, tokenizer, text_encoder: torch.nn.Module):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_length = tokenizer.model_max_length
        self._empty: torch.Tensor | None = None
        self._backend = _private_backend(tokenizer)

    def tokenize(self, prompts: Sequence[str]) -> TokenizedPrompts:
        """Padded ids `[B, max_length]`, the untruncated prompt-token counts, truncation flags."""
        tok = self.tokenizer
        # One tokenizer pass without special tokens gives both the ids and the true length;
        # BOS + first (max_length - 2) tokens + EOS is what truncation=True produces.
        if self._backend is not None:  # the same ids, without transformers' per-row Python work
            content = [e.ids for e in self._backend.encode_batch(list(prompts), add_special_tokens=False)]
        else:
            content = tok(list(prompts), add_special_tokens=False, verbose=False).input_ids
        keep = self.max_length - 2
        rows = []
        for ids in content:
            row = [tok.bos_token_id, *ids[:keep], tok.eos_token_id]
            rows.append(row + [tok.pad_token_id] * (self.max_length - len(row)))
        n_tokens = [len(ids) for ids in content]
        return TokenizedPrompts(torch.tensor(rows, dtype=torch.long), n_tokens, [n > keep for n in n_tokens])

    def encode(self, prompts: Sequence[str]) -> EncodedPrompts:
        """Last hidden state of the text encoder for each prompt (the pipeline's `prompt_embeds`)."""
        return self.encode_tokens(self.tokenize(prompts))

    def encode_tokens(self, tokens: TokenizedPrompts) -> EncodedPrompts:
        """`encode` for prompts tokenized already (by a background thread, say)."""
        input_ids, n_tokens, truncated = tokens.input_ids, tokens.n_tokens, tokens.truncated
        device = self.text_encoder.device
        attention_mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            attention_mask = (input_ids != self.tokenizer.pad_token_id).long().to(device)
        hidden = self.text_encoder(input_ids.to(device), attention_mask=attention_mask)[0]
        return EncodedPrompts(hidden.to(self.text_encoder.dtype), input_ids, n_tokens, truncated)

    def empty_embedding(self) -> torch.Tensor:
        """`e_0`: the embedding of the empty prompt, `[1, L, D]`, computed once."""
        if self._empty is None:
            with torch.no_grad():
                self._empty = self.encode([""]).embeddings
        return self._empty
