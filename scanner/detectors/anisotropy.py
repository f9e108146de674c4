"""`anisotropy`: Asthana & Belagiannis, ICLR 2026 (code: rohanasthana/memorization-anisotropy).

Both terms from the same pure-noise `x_T`, no trajectory (`local_model/pipe.py`, `detect_eval.py`):
- `N = || f_c(x_T, t_0) - f_u(x_T, t_0) ||_2` over the whole latent (Wen's first-step score);
- `C = mean_(h, w) cos_channels( f_u(x_T, t_cos), f_c(x_T, t_cos) - f_u(x_T, t_cos) )`, the
  cosine over the latent channels at each position, averaged over positions, at the
  low-noise timestep `t_cos = timesteps[-3]` (41 of 50 DDIM steps), still on `x_T`;
- score `= gamma_1 * mean_k N_k + gamma_2 * mean_k C_k` over the generations.
Predictions are taken in the scanner's score space (epsilon converted in full for the
cosine; `model` space is the reference's SD 2.x choice, raw v-predictions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..encode import TokenizedPrompts
from ..families import cond_repeat
from .base import Detector, check_steps, in_space, prompt_rows, wide

COSINE_EPS = 1e-8  # torch.nn.functional.cosine_similarity's default, which the reference uses


@dataclass(frozen=True)
class AnisotropySettings:
    """The reference's SD 1.x defaults (`run_detection.sh`, `detect_eval.py`); SD 2.x used `cosine_weight=0.1`."""

    generations: int = 1
    num_inference_steps: int = 50
    cosine_step: int = -3  # t_cos = timesteps[cosine_step]
    norm_weight: float = 1.0  # gamma_1
    cosine_weight: float = 2.0  # gamma_2


def channel_cosine(u: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Per row, the mean over positions of the cosine over channels of `u` and `d` `[R, C, H, W]` -> `[R]`."""
    dot = (u * d).sum(dim=1)
    norms = u.norm(dim=1).clamp_min(COSINE_EPS) * d.norm(dim=1).clamp_min(COSINE_EPS)
    return (dot / norms).flatten(1).mean(dim=1)


class AnisotropyDetector(Detector):
    """Guidance norm at high noise plus guidance/unconditional alignment at low noise."""

    name = "anisotropy"
    settings_type = AnisotropySettings

    def __init__(self, scanner, settings: AnisotropySettings | None = None):
        super().__init__(scanner, settings)
        s = self.settings
        check_steps(s.num_inference_steps, s.cosine_step)
        self.trajectory = self.family.schedule(s.num_inference_steps)
        self.cosine_step = s.cosine_step % s.num_inference_steps
        self.x = self.trajectory.initial(self.latents(s.generations))

    def forwards_per_prompt(self) -> int:
        """One conditional forward at each of the two timesteps per generation (unconditional ones cached)."""
        return 2 * self.settings.generations

    def score(self, prompts: Sequence[str], tokens: TokenizedPrompts | None = None) -> np.ndarray:
        """`gamma_1 * N + gamma_2 * C` per prompt."""
        s, space = self.settings, self.scanner.settings.score_space
        with torch.no_grad():
            cond = cond_repeat(self.encode(prompts, tokens), s.generations)
            x = prompt_rows(self.x, len(prompts))
            terms = []
            for step in (0, self.cosine_step):
                u = prompt_rows(self.unconditional(self.trajectory, step, self.x), len(prompts))
                c = self.conditional(self.trajectory, step, x, cond)
                terms.append((wide(in_space(u, x, self.trajectory, step, space)), wide(in_space(c, x, self.trajectory, step, space))))
            (u0, c0), (uc, cc) = terms
            norm = (c0 - u0).flatten(1).norm(dim=1)
            cosine = channel_cosine(uc, cc - uc)
            per_generation = s.norm_weight * norm + s.cosine_weight * cosine
        return per_generation.view(len(prompts), s.generations).mean(dim=1).double().cpu().numpy()
