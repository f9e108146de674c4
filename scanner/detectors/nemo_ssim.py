"""`nemo-ssim`: Hintersdorf et al., NeurIPS 2024, NeMo's memorization gate
(code: ml-research/localizing_memorization_in_diffusion_models, `utils/activation_detection.py`).

For each of `n` initial latents `x_T^k` (the same for every prompt), the conditional noise
prediction minus the initial noise, `D_k = eps_c(x_T^k, timesteps[1]) - x_T^k` (no guidance;
the reference's loop discards step 0 and predicts on the unchanged `x_T` at the second
timestep, 961 of 50 DDIM steps), min-max scaled per sample and channel over positions; then
the MS-SSIM (torchmetrics 1.3.2, `scanner.detectors.ssim`) of all `n (n - 1) / 2` pairs, and
the score is the largest (the reference flags a prompt when any pair exceeds 0.428).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import MemscanError
from ..encode import TokenizedPrompts
from ..families import cond_repeat
from .base import Detector, check_steps, in_space, prompt_rows
from .ssim import check_size, ms_ssim

REDUCTIONS = ("max", "mean")


@dataclass(frozen=True)
class NemoSsimSettings:
    """The reference's defaults (`3_detect_memorized_neurons.py`: 10 samples, guidance 0, torchmetrics' MS-SSIM)."""

    generations: int = 10
    num_inference_steps: int = 50
    step: int = 1  # the reference predicts at timesteps[1]
    sigma: float = 1.5
    betas: tuple[float, ...] = (0.33, 0.33, 0.33)
    reduction: str = "max"  # over pairs; "mean" is a variant, not the reference
    latent_size: int | None = None  # None: the model's; small models need a larger one for 3 scales at sigma 1.5

    def __post_init__(self) -> None:
        if self.generations < 2:
            raise MemscanError(f"nemo-ssim compares generations pairwise, so it needs at least 2, got {self.generations}")
        if self.reduction not in REDUCTIONS:
            raise MemscanError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {self.reduction!r}")


def noise_maps(eps: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`eps - x` min-max scaled to [0, 1] per row and channel over positions `[R, C, H, W]`."""
    d = eps - x
    low, high = d.amin(dim=(2, 3), keepdim=True), d.amax(dim=(2, 3), keepdim=True)
    return (d - low) / (high - low)


class NemoSsimDetector(Detector):
    """Largest pairwise MS-SSIM of the first prediction's noise maps across seeds."""

    name = "nemo-ssim"
    settings_type = NemoSsimSettings

    def __init__(self, scanner, settings: NemoSsimSettings | None = None):
        super().__init__(scanner, settings)
        s = self.settings
        check_steps(s.num_inference_steps, s.step)
        self.latent = self.latents(s.generations, s.latent_size)
        check_size(min(self.latent.shape[-2:]), s.sigma, len(s.betas))
        self.trajectory = self.family.schedule(s.num_inference_steps)
        self.step = s.step % s.num_inference_steps
        self.x = self.trajectory.initial(self.latent)
        self.pairs = torch.combinations(torch.arange(s.generations), 2).to(self.x.device)

    def forwards_per_prompt(self) -> int:
        """One conditional forward per generation (no unconditional branch at guidance 0)."""
        return self.settings.generations

    def score(self, prompts: Sequence[str], tokens: TokenizedPrompts | None = None) -> np.ndarray:
        """The max (or mean) pairwise MS-SSIM of each prompt's noise maps."""
        n, b = self.settings.generations, len(prompts)
        with torch.no_grad():
            cond = cond_repeat(self.encode(prompts, tokens), n)
            x = prompt_rows(self.x, b)
            eps = in_space(self.conditional(self.trajectory, self.step, x, cond), x, self.trajectory, self.step, "epsilon")
            # MS-SSIM in float64: its moments `E[xy] - mu_x mu_y` cancel, and in fp32 a low score lost 1.5%.
            maps = noise_maps(eps.double(), x.double()).unflatten(0, (b, n))
            ssim = ms_ssim(maps[:, self.pairs[:, 0]], maps[:, self.pairs[:, 1]], self.settings.betas, self.settings.sigma)
            reduced = ssim.amax(dim=1) if self.settings.reduction == "max" else ssim.mean(dim=1)
        return reduced.cpu().numpy()
