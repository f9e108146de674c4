"""Explanations: a prompt's score and each word's significance, by either method."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ..detect import Scanner
from ..errors import MemscanError
from .ablation import ablation_scores
from .gradient import token_significance
from .words import Word, drop_words, split_words

METHODS = ("grad", "ablation")
# The more faithful on the testbed: dropping its top word lowers the score by 0.375 on average,
# gradient's by 0.170, a random word's by 0.098 (docs/explain.md, "Faithfulness").
DEFAULT_METHOD = "ablation"
SIGNIFICANCE_LEVELS = 4


@dataclass
class WordScore:
    """One word: its text and span in the prompt, its significance and share of the total.

    `score_without` is the prompt's score with the word removed (ablation only).
    """

    word: str
    start: int
    end: int
    score: float
    share: float
    score_without: float | None = None


@dataclass
class Suggestion:
    """Words whose removal together brings a flagged prompt under the threshold (greedy), and the result."""

    words: list[int]  # indices into `Explanation.words`, in the order they were dropped
    prompt: str  # the prompt without them
    score: float  # its score
    safe: bool  # the score is under the threshold (False only when every word was dropped and it still is not)


@dataclass
class Explanation:
    """A prompt's memorization score and its words' significances; `suggestion` only for flagged prompts."""

    prompt: str
    score: float
    method: str
    words: list[WordScore]
    truncated: bool
    suggestion: Suggestion | None = None

    def flagged(self, threshold: float | None) -> bool | None:
        """Whether the score reaches `threshold`; None when there is no threshold."""
        return None if threshold is None else bool(self.score >= threshold)

    def segments(self) -> list[tuple[str, float, int]]:
        """The prompt as `(text, share, level)` pieces: words with their `significance_level`, gaps at 0."""
        top = max((w.share for w in self.words), default=0.0)
        pieces, cursor = [], 0
        for word in self.words:
            if word.start > cursor:
                pieces.append((self.prompt[cursor : word.start], 0.0, 0))
            pieces.append((word.word, word.share, significance_level(word.share, top)))
            cursor = word.end
        if cursor < len(self.prompt):
            pieces.append((self.prompt[cursor:], 0.0, 0))
        return pieces

    def to_dict(self, threshold: float | None = None) -> dict:
        """The machine-readable form (`memscan explain --format json`, `/v1/explain`)."""
        return {
            "prompt": self.prompt,
            "score": self.score,
            "threshold": threshold,
            "flagged": self.flagged(threshold),
            "method": self.method,
            "truncated": self.truncated,
            "words": [asdict(w) for w in self.words],
            "suggestion": None if self.suggestion is None else asdict(self.suggestion),
        }


def significance_level(share: float, top: float) -> int:
    """A word's display level, 0 (none) to SIGNIFICANCE_LEVELS, from its share relative to the top share."""
    # Relative to the top share, so the most significant word always gets the strongest level.
    return 0 if top <= 0 or share <= 0 else 1 + min(SIGNIFICANCE_LEVELS - 1, int(SIGNIFICANCE_LEVELS * share / top - 1e-9))


def shares(scores: np.ndarray) -> np.ndarray:
    """Each word's part of the total of the positive scores (negative ones get 0)."""
    positive = np.clip(scores, 0.0, None)
    total = positive.sum()
    return positive / total if total > 0 else np.zeros_like(positive)


def suggest_removal(scanner: Scanner, prompt: str, words: Sequence[Word], threshold: float) -> Suggestion:
    """Greedy: drop the word whose removal lowers the score most, re-score, repeat until under `threshold`."""
    dropped: list[int] = []
    current, score = prompt, float("inf")
    while len(dropped) < len(words):
        left = [i for i in range(len(words)) if i not in dropped]
        variants = [drop_words(prompt, [words[j] for j in (*dropped, i)]) for i in left]
        scores = scanner.score(variants).score  # every candidate of this round in one batch
        best = int(np.argmin(scores))
        dropped.append(left[best])
        current, score = variants[best], float(scores[best])
        if score < threshold:
            break
    return Suggestion(dropped, current, score, score < threshold)


def explain(
    scanner: Scanner, prompts: Sequence[str], method: str = DEFAULT_METHOD, threshold: float | None = None
) -> list[Explanation]:
    """Explain each prompt: `ablation` (leave one word out; the default) or `grad` (gradient significance);
    with a `threshold`, each flagged prompt gets a `Suggestion`."""
    if method not in METHODS:
        raise MemscanError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if scanner.settings.noise != "shared":
        raise MemscanError("explanations use the shared initial latents; use --noise shared")
    prompts = list(prompts)
    words = [split_words(scanner.family.tokenizer, p, scanner.family.preprocess) for p in prompts]
    detected = scanner.score(prompts)
    if method == "grad":
        significance = token_significance(scanner, prompts)
        word_scores = [np.array([significance[b, list(w.positions)].sum() for w in ws]) for b, ws in enumerate(words)]
        without = [[None] * len(ws) for ws in words]
    else:
        ablated = ablation_scores(scanner, prompts, words)
        word_scores = [a[0] - a[1:] for a in ablated]
        without = [a[1:].tolist() for a in ablated]
    out = []
    for b, prompt in enumerate(prompts):
        ws, scores = words[b], word_scores[b]
        rows = [
            WordScore(w.text, w.start, w.end, float(s), float(sh), wo)
            for w, s, sh, wo in zip(ws, scores, shares(scores), without[b])
        ]
        score = float(detected.score[b])
        flagged = threshold is not None and score >= threshold and bool(ws)
        suggestion = suggest_removal(scanner, prompt, ws, threshold) if flagged else None
        out.append(Explanation(prompt, score, method, rows, detected.truncated[b], suggestion))
    return out
