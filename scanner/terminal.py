"""Explanations as terminal text: words coloured by their share of the significance."""

from __future__ import annotations

from .explain import Explanation

# Background colours (xterm-256) from faint to strong; a word's level is its share
# relative to the largest share, so the most significant word is always the strongest.
LEVELS = (None, 229, 221, 208, 196)
RESET = "\033[0m"


def _level(share: float, top: float) -> int:
    return 0 if top <= 0 or share <= 0 else 1 + min(3, int(4 * share / top - 1e-9))


def highlight(explanation: Explanation, color: bool) -> str:
    """The prompt with each word coloured by significance, or marked `word[NN%]` without colour."""
    top = max((w.share for w in explanation.words), default=0.0)
    out, cursor = [], 0
    for word in explanation.words:
        out.append(explanation.prompt[cursor : word.start])
        level = _level(word.share, top)
        if not color:
            out.append(f"{word.word}[{100 * word.share:.0f}%]" if level else word.word)
        elif LEVELS[level] is None:
            out.append(word.word)
        else:
            out.append(f"\033[30;48;5;{LEVELS[level]}m{word.word}{RESET}")
        cursor = word.end
    out.append(explanation.prompt[cursor:])
    return "".join(out)


def verdict(explanation: Explanation, threshold: float | None) -> str:
    """`score 0.4213  FLAGGED (threshold 0.4)`, `... safe (...)`, or the score alone."""
    text = f"score {explanation.score:.4f}"
    flagged = explanation.flagged(threshold)
    if flagged is None:
        return text + "  (no --threshold: no verdict)"
    return text + f"  {'FLAGGED' if flagged else 'safe'} (threshold {threshold:g})"


def top_words(explanation: Explanation, count: int = 3) -> str:
    """The most significant words with their shares, e.g. `horse 41%, riding 22%`."""
    ranked = sorted((w for w in explanation.words if w.share > 0), key=lambda w: -w.share)[:count]
    return ", ".join(f"{w.word} {100 * w.share:.0f}%" for w in ranked) or "none"
