"""Prompt -> words: tokenizer pieces joined back into the words the user typed.

CLIP's BPE marks the last piece of every pre-tokenized word with `</w>`; punctuation is a
word of its own (`horse,` is `horse</w>` `,</w>`). T5's sentencepiece marks the first piece of
a word with `▁`. A run of digits is one word (CLIP splits "1914" into four pieces, each a
word of its own). Each word keeps its span in the original prompt (for display and for
dropping it) and its token positions in the text-encoder input (after BOS where the
tokenizer has one: CLIP's first prompt token is position 1, T5's position 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..encode import PromptTokenizer

WORD_END = "</w>"  # CLIP: the last piece of a word
WORD_START = "\u2581"  # sentencepiece: the first piece of a word


@dataclass(frozen=True)
class Word:
    """One word of a prompt: its text, its `[start, end)` span, its token positions."""

    text: str
    start: int
    end: int
    positions: tuple[int, ...]


def split_words(tokenizer: PromptTokenizer, prompt: str, preprocess: Callable[[str], str] | None = None) -> list[Word]:
    """The prompt's words that the text encoder sees (words past the truncation are left out).

    `preprocess` is the family's own (PixArt lowercases and strips): the words are found in the
    text the tokenizer really sees, and their spans mapped back to the prompt, which works as
    long as preprocessing only changes case and cuts the ends.
    """
    hf = tokenizer.tokenizer
    text = preprocess(prompt) if preprocess else prompt
    shift = max(prompt.lower().find(text.lower()), 0)  # where the preprocessed text starts in the prompt
    encoded = hf(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    pieces = hf.convert_ids_to_tokens(encoded.input_ids)
    kept, offset = tokenizer.keep, len(tokenizer.bos)  # as PromptTokenizer truncates and places them
    words: list[Word] = []
    first = 0
    for i, piece in enumerate(pieces[:kept]):
        last = i + 1 == len(pieces) or i + 1 == kept
        if last or piece.endswith(WORD_END) or pieces[i + 1].startswith(WORD_START):
            start, end = encoded.offset_mapping[first][0] + shift, encoded.offset_mapping[i][1] + shift
            while start < end and prompt[start].isspace():  # sentencepiece spans may start at the space
                start += 1
            word = Word(prompt[start:end], start, end, tuple(range(first + offset, i + 1 + offset)))
            if words and _digit_run(words[-1], word, prompt):
                previous = words.pop()
                word = Word(prompt[previous.start : end], previous.start, end, previous.positions + word.positions)
            words.append(word)
            first = i + 1
    return words


def _digit_run(left: Word, right: Word, prompt: str) -> bool:
    """True when `right` continues the digits of `left` with nothing between them."""
    return left.end == right.start and prompt[left.start : left.end].isdigit() and prompt[right.start : right.end].isdigit()


def drop_word(prompt: str, word: Word) -> str:
    """The prompt with `word` cut out and the whitespace around the cut joined to one space."""
    left, right = prompt[: word.start].rstrip(), prompt[word.end :].lstrip()
    return " ".join(part for part in (left, right) if part)


def drop_words(prompt: str, words: Sequence[Word]) -> str:
    """The prompt with every word of `words` cut out, as `drop_word` cuts one."""
    # From the right: a cut moves only the text after it, so the spans on its left stay valid.
    for word in sorted(words, key=lambda w: -w.start):
        prompt = drop_word(prompt, word)
    return prompt
