"""Faithfulness of explanations: does dropping the top-ranked word lower the score more than
dropping a random word? Measured for both methods on the same prompts, plus how often the
two methods agree on the top word.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..detect import Scanner
from .explanation import explain


@dataclass
class Faithfulness:
    """Mean score drops over the prompts (a random word: the mean over all its words)."""

    prompts: int
    drop_top_grad: float
    drop_top_ablation: float
    drop_random_word: float
    top_word_agreement: float


def faithfulness(scanner: Scanner, prompts: Sequence[str], batch_size: int = 16) -> Faithfulness:
    """Score drops when each method's top word is removed, against a uniformly random word."""
    top_grad, top_ablation, random_word, agree = [], [], [], []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        ablation = explain(scanner, batch, "ablation")
        grad = explain(scanner, batch, "grad")
        for by_ablation, by_grad in zip(ablation, grad):
            if not by_ablation.words:
                continue
            # An ablation word score is exactly the drop when that word is removed.
            drops = np.array([w.score for w in by_ablation.words])
            g = int(np.argmax([w.score for w in by_grad.words]))
            a = int(np.argmax(drops))
            top_grad.append(drops[g])
            top_ablation.append(drops[a])
            random_word.append(drops.mean())
            agree.append(g == a)
    return Faithfulness(
        prompts=len(agree),
        drop_top_grad=float(np.mean(top_grad)),
        drop_top_ablation=float(np.mean(top_ablation)),
        drop_random_word=float(np.mean(random_word)),
        top_word_agreement=float(np.mean(agree)),
    )
