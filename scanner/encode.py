"""Prompt -> text-encoder output, tokenized exactly as `StableDiffusionPipeline` does."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class EncodedPrompts:
    """Text-encoder outputs `[B, L, D]` with each prompt's token count and truncation."""

    embeddings: torch.Tensor
    input_ids: torch.Tensor
    n_tokens: list[int]
    truncated: list[bool]


class PromptEncoder:
    """Tokenize (pad to `model_max_length`, truncate longer prompts) and encode in one batch."""

    def __init__(self, tokenizer, text_encoder: torch.nn.Module):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_length = tokenizer.model_max_length
        self._empty: torch.Tensor | None = None

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, list[int], list[bool]]:
        """Padded ids `[B, max_length]`, the untruncated prompt-token counts, truncation flags."""
        tok = self.tokenizer
        # One tokenizer pass without special tokens gives both the ids and the true length;
        # BOS + first (max_length - 2) tokens + EOS is what truncation=True produces.
        content = tok(list(prompts), add_special_tokens=False, verbose=False).input_ids
        keep = self.max_length - 2
        rows = []
        for ids in content:
            row = [tok.bos_token_id, *ids[:keep], tok.eos_token_id]
            rows.append(row + [tok.pad_token_id] * (self.max_length - len(row)))
        n_tokens = [len(ids) for ids in content]
        return torch.tensor(rows, dtype=torch.long), n_tokens, [n > keep for n in n_tokens]

    def encode(self, prompts: Sequence[str]) -> EncodedPrompts:
        """Last hidden state of the text encoder for each prompt (the pipeline's `prompt_embeds`)."""
        input_ids, n_tokens, truncated = self.tokenize(prompts)
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
