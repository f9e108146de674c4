"""Which words make a prompt memorized: gradient significance and leave-one-word-out ablation."""

from .ablation import ablation_scores
from .explanation import DEFAULT_METHOD, METHODS, Explanation, Suggestion, WordScore, explain, shares, suggest_removal
from .faithfulness import Faithfulness, faithfulness
from .gradient import token_significance
from .words import Word, drop_word, drop_words, split_words

__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "Explanation",
    "Faithfulness",
    "Word",
    "Suggestion",
    "WordScore",
    "ablation_scores",
    "drop_word",
    "drop_words",
    "explain",
    "faithfulness",
    "shares",
    "split_words",
    "suggest_removal",
    "token_significance",
]
