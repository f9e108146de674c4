"""`sail`: Jeon, Kim & No, ICML 2025, sharpness (code: Dongjae0324/sharpness_memorization_diffusion).

With the score `s_e(x) = -eps(x, t, e) / sigma_t` and its Jacobian `H_e = ds_e/dx` (the Hessian
of the log density), at pure noise `x_T` and the first timestep (`local_model/pipe.py`):

    SAIL = || (H_c - H_u) (s_c - s_u) ||_2 = || (J_c - J_u)(eps_c - eps_u) ||_2 / sigma_t^2

with `J_e = d eps(x_T, t_0, e) / dx`, the norm over the whole latent, the tangent not
normalized; the prompt's score is the mean over generations. Both Jacobian-vector products
come from one forward-mode pass (`torch.func.jvp`) over the `[uncond; cond]` batch, with the
tangent entering both halves. In another score space the outputs are first scaled by
`k = Trajectory.score_scale` (so the score by `k^2`): the ranking never changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..encode import TokenizedPrompts
from ..families import cond_cat, cond_expand, cond_repeat
from .base import Detector, alpha_sigma, prompt_rows, wide


@dataclass(frozen=True)
class SailSettings:
    """The reference's defaults: first step only (`hvp_sampling_num = 1`), `gen_num` 1 (it also runs 4)."""

    generations: int = 1
    num_inference_steps: int = 50


class SailDetector(Detector):
    """The Hessian-difference-vector product at the first step, by forward-mode AD."""

    name = "sail"
    settings_type = SailSettings
    eager_only = "it takes forward-mode derivatives (torch.func.jvp) of the denoiser"

    def __init__(self, scanner, settings: SailSettings | None = None):
        super().__init__(scanner, settings)
        # Forward-mode AD needs an eager, differentiable denoiser (compiled engines cannot).
        self.engine = scanner.autograd_engine()
        self.trajectory = self.family.schedule(self.settings.num_inference_steps)
        self.x = self.trajectory.initial(self.latents(self.settings.generations))
        _, sigma = alpha_sigma(self.trajectory, 0)
        self.scale = self.trajectory.score_scale(scanner.settings.score_space, 0) ** 2 / sigma**2

    def forwards_per_prompt(self) -> int:
        """One conditional forward per generation (the tangent); the unconditional one is cached."""
        return self.settings.generations

    def jvps_per_prompt(self) -> int:
        """Two JVP rows per generation, conditional and unconditional (the tangent depends on the prompt)."""
        return 2 * self.settings.generations

    def score(self, prompts: Sequence[str], tokens: TokenizedPrompts | None = None) -> np.ndarray:
        """`mean_k || (J_c - J_u)(f_c - f_u) ||_2 * k^2 / sigma_t^2` per prompt."""
        n, b = self.settings.generations, len(prompts)
        t = self.trajectory.timesteps[0]
        with torch.no_grad():
            cond = cond_repeat(self.encode(prompts, tokens), n)
            x = prompt_rows(self.x, b)
            u_rows = self.unconditional(self.trajectory, 0, self.x)
            tangent = self.conditional(self.trajectory, 0, x, cond) - prompt_rows(u_rows, b)
            both = cond_cat(cond_expand(self.family.unconditional(), b * n), cond)

            def branches(z: torch.Tensor) -> torch.Tensor:
                return self.engine.predict(self.trajectory.model_input(torch.cat([z, z]), 0), t, both)

            # The math SDPA kernel is the one with forward-mode derivatives (the flash and
            # memory-efficient kernels have none), as the reference's `_jvp_mode_enabled`.
            with sdpa_kernel([SDPBackend.MATH]):
                _, products = torch.func.jvp(branches, (x,), (tangent,))
            ju, jc = wide(products).chunk(2)
            sail = (jc - ju).flatten(1).norm(dim=1) * self.scale
        return sail.view(b, n).mean(dim=1).double().cpu().numpy()
