"""Gradient token significance (method.md, "Explanation").

`L = sum_generations || unet(x_s, t_s, e) - unet(x_s, t_s, e_0) ||_2` in epsilon space;
token `i`'s significance is `|| dL/de_i ||_2`, averaged over the scored steps. The CFG
trajectory to each `x_s` comes from the Scanner (no gradient through it, correct guidance
order); only the scored step's conditional prediction is differentiated.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..detect import Scanner


def token_significance(scanner: Scanner, prompts: Sequence[str]) -> np.ndarray:
    """`[B, L]`: each token position's mean `|| dL/de_i ||_2` over the scored steps, all positions."""
    engine = scanner.autograd_engine()
    n = scanner.settings.generations
    with torch.no_grad():
        embeddings = scanner.encoder.encode(prompts).embeddings
        latents = scanner.shared_latents().expand(len(prompts), -1, -1, -1, -1)
        states = scanner.scored_states(embeddings, latents)
    total = torch.zeros(embeddings.shape[:2], dtype=torch.float32, device=embeddings.device)
    for step, t, x, uncond in states:
        # Each prompt's L depends on its own embedding only, so one backward of the batch
        # sum gives every prompt's gradient.
        e = embeddings.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            cond = engine.predict_noise(scanner.scheduler.scale_model_input(x, t), t, e.repeat_interleave(n, dim=0))
            diff = cond.to(torch.promote_types(cond.dtype, torch.float32)) - uncond  # fp32 or wider
            loss = diff.flatten(1).norm(dim=1).sum() * scanner.eps_scales[step]
            (grad,) = torch.autograd.grad(loss, e)
        total += grad.float().norm(dim=-1)
    return (total / len(states)).cpu().numpy()
