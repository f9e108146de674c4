"""Which words make a prompt memorized: gradient significance and leave-one-word-out ablation."""

from .ablation import ablation_scores
from .explanation import METHODS, Explanation, WordScore, explain, shares
from .faithfulness import Faithfulness, faithfulness
from .gradient import token_significance
from .words import Word, drop_word, split_words

__all__ = [
    "METHODS",
    "Explanation",
    "Faithfulness",
    "Word",
    "WordScore",
    "ablation_scores",
    "drop_word",
    "explain",
    "faithfulness",
    "shares",
    "split_words",
    "token_significance",
]
