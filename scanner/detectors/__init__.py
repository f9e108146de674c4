"""Memorization detectors behind one interface (`Detector.score(prompts) -> [B]`, higher = memorized).

`create_detector(name, scanner)` builds one over a loaded `Scanner` (its model, family adapter,
engine and seed); each detector's settings default to its paper's reference code. See
docs/detectors.md for the formulas, defaults and costs.
"""

from __future__ import annotations

from typing import Any

from ..detect import Scanner
from ..errors import MemscanError
from .anisotropy import AnisotropyDetector, AnisotropySettings
from .attention_entropy import AttentionEntropyDetector, AttentionEntropySettings
from .base import Detector
from .nemo_ssim import NemoSsimDetector, NemoSsimSettings
from .sail import SailDetector, SailSettings
from .wen import WenDetector

DETECTORS: dict[str, type[Detector]] = {
    cls.name: cls for cls in (WenDetector, AnisotropyDetector, SailDetector, AttentionEntropyDetector, NemoSsimDetector)
}


def create_detector(name: str, scanner: Scanner, settings: Any = None) -> Detector:
    """The detector `name` over `scanner`, with its own default settings unless `settings` is given."""
    if name not in DETECTORS:
        raise MemscanError(f"unknown detector {name!r} (available: {', '.join(DETECTORS)})")
    return DETECTORS[name](scanner, settings)


__all__ = [
    "DETECTORS",
    "AnisotropyDetector",
    "AnisotropySettings",
    "AttentionEntropyDetector",
    "AttentionEntropySettings",
    "Detector",
    "NemoSsimDetector",
    "NemoSsimSettings",
    "SailDetector",
    "SailSettings",
    "WenDetector",
    "create_detector",
]
