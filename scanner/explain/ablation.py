"""Leave-one-word-out significance: gradient-free, so it works on any engine.

A word's score is `score(prompt) - score(prompt without the word)`: positive when the word
raises the memorization score. Every variant of every prompt is scored in one
`Scanner.score` batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..detect import Scanner
from .words import Word, drop_word


def ablation_scores(scanner: Scanner, prompts: Sequence[str], words: Sequence[Sequence[Word]]) -> list[np.ndarray]:
    """Per prompt, `[score, score without word 1, score without word 2, ...]`."""
    batch = []
    for prompt, prompt_words in zip(prompts, words):
        batch += [prompt, *(drop_word(prompt, word) for word in prompt_words)]
    scores = scanner.score(batch).score
    out, offset = [], 0
    for prompt_words in words:
        out.append(scores[offset : offset + 1 + len(prompt_words)])
        offset += 1 + len(prompt_words)
    return out
