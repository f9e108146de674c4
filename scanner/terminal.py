"""Explanations as terminal text: words coloured by their share of the significance."""

from __future__ import annotations

from .calibration import format_threshold
from .explain import Explanation

# Background colours (xterm-256) of the significance levels 0..4 (explanation.segments).
LEVELS = (None, 229, 221, 208, 196)
RESET = "\033[0m"


def highlight(explanation: Explanation, color: bool) -> str:
    """The prompt with each word coloured by significance, or marked `word[NN%]` without colour."""
    out = []
    for text, share, level in explanation.segments():
        if not level:
            out.append(text)
        elif color:
            out.append(f"\033[30;48;5;{LEVELS[level]}m{text}{RESET}")
        else:
            out.append(f"{text}[{100 * share:.0f}%]")
    return "".join(out)


def verdict(explanation: Explanation, threshold: float | None) -> str:
    """`score 0.4213  FLAGGED (threshold 0.4)`, `... safe (...)`, or the score alone."""
    text = f"score {explanation.score:.4f}"
    flagged = explanation.flagged(threshold)
    if flagged is None:
        return text + "  (no threshold: no verdict)"
    return text + f"  {'FLAGGED' if flagged else 'safe'} (threshold {format_threshold(threshold)})"


def top_words(explanation: Explanation, count: int = 3) -> str:
    """The most significant words with their shares, e.g. `horse 41%, riding 22%`."""
    ranked = sorted((w for w in explanation.words if w.share > 0), key=lambda w: -w.share)[:count]
    return ", ".join(f"{w.word} {100 * w.share:.0f}%" for w in ranked) or "none"


def suggestion_line(explanation: Explanation) -> str:
    """`suggested: drop "of", "!" -> score 0.4120 (safe)`: the words whose removal makes a flagged prompt safe."""
    suggestion = explanation.suggestion
    words = ", ".join(f'"{explanation.words[i].word}"' for i in suggestion.words)
    outcome = "safe" if suggestion.safe else "still flagged with every word dropped"
    return f"suggested: drop {words} -> score {suggestion.score:.4f} ({outcome})"
