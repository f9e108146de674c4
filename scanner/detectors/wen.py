"""`wen`: Wen et al., ICLR 2024, the project's own score (`Scanner.score`, docs/method.md).

`|| f(x_s, t_s, c_p) - f(x_s, t_s, c_0) ||_2` in the score space, averaged over the scanner's
step window and generations. Its settings are the scanner's `DetectSettings`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..detect import DetectSettings, Scanner
from ..encode import TokenizedPrompts
from ..errors import MemscanError
from .base import Detector


class WenDetector(Detector):
    """The scanner's own score, unchanged."""

    name = "wen"
    settings_type = DetectSettings

    def __init__(self, scanner: Scanner, settings: DetectSettings | None = None):
        if settings is not None and settings.for_family(type(scanner.family)) != scanner.settings:
            raise MemscanError("the wen detector scores with its scanner's settings; build the Scanner with these settings instead")
        super().__init__(scanner, scanner.settings)

    def forwards_per_prompt(self) -> int:
        """`n` conditional forwards on the first-step fast path; else both branches at every step walked."""
        s = self.settings
        if s.first_step_only and self.scanner.reuse_uncond:
            return s.generations
        return 2 * s.generations * s.end_step

    def score(self, prompts: Sequence[str], tokens: TokenizedPrompts | None = None) -> np.ndarray:
        """`Scanner.score(prompts).score` as float64."""
        return self.scanner.score(list(prompts), tokens=tokens).score.astype(np.float64)
