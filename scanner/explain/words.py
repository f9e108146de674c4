"""Prompt -> words: CLIP BPE pieces joined back into the words the user typed.

CLIP's BPE marks the last piece of every pre-tokenized word with `</w>`; punctuation is a
word of its own (`horse,` is `horse</w>` `,</w>`). Each word keeps its span in the
original prompt (for display and for dropping it) and its token positions in the
text-encoder input (position 0 is BOS, so the prompt's first token is position 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

WORD_END = "</w>"


@dataclass(frozen=True)
class Word:
    """One word of a prompt: its text, its `[start, end)` span, its token positions."""

    text: str
    start: int
    end: int
    positions: tuple[int, ...]


def split_words(tokenizer: PreTrainedTokenizerFast, prompt: str) -> list[Word]:
    """The prompt's words that the text encoder sees (words past the truncation are left out)."""
    encoded = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    pieces = tokenizer.convert_ids_to_tokens(encoded.input_ids)
    kept = tokenizer.model_max_length - 2  # BOS + kept tokens + EOS, as PromptEncoder truncates
    words, first = [], 0
    for i, piece in enumerate(pieces[:kept]):
        last = i + 1 == len(pieces) or i + 1 == kept
        if piece.endswith(WORD_END) or last:
            start, end = encoded.offset_mapping[first][0], encoded.offset_mapping[i][1]
            words.append(Word(prompt[start:end], start, end, tuple(range(first + 1, i + 2))))
            first = i + 1
    return words


def drop_word(prompt: str, word: Word) -> str:
    """The prompt with `word` cut out and the whitespace around the cut joined to one space."""
    left, right = prompt[: word.start].rstrip(), prompt[word.end :].lstrip()
    return " ".join(part for part in (left, right) if part)
