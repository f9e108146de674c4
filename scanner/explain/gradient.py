"""Gradient token significance (method.md, "Explanation").

`L = sum_generations || f(x_s, t_s, c) - f(x_s, t_s, c_0) ||_2` in the score space;
token `i`'s significance is `|| dL/de_i ||_2`, averaged over the scored steps, where `e` is the
family's per-token sequence (`Family.sequence_key`: the text encoder output for SD 1.x/2.x,
both CLIP encoders' concatenated for SDXL, the joint CLIP + T5 sequence for SD3, T5's for
Flux and PixArt). The CFG trajectory to each `x_s` comes from the Scanner (no gradient through
it, correct guidance order); only the scored step's conditional prediction is differentiated.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..detect import Scanner
from ..families import cond_repeat


def token_significance(scanner: Scanner, prompts: Sequence[str]) -> np.ndarray:
    """`[B, L]`: each sequence position's mean `|| dL/de_i ||_2` over the scored steps, all positions."""
    engine = scanner.autograd_engine()
    key = scanner.family.sequence_key
    n = scanner.settings.generations
    with torch.no_grad():
        cond = scanner.family.encode(prompts)
        latents = scanner.shared_latents().expand(len(prompts), -1, -1, -1, -1)
        states = scanner.scored_states(cond, latents)
    sequence = cond[key]
    total = torch.zeros(sequence.shape[:2], dtype=torch.float32, device=sequence.device)
    for step, t, x, uncond in states:
        # Each prompt's L depends on its own sequence only, so one backward of the batch
        # sum gives every prompt's gradient.
        e = sequence.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            rows = cond_repeat({**cond, key: e}, n)
            out = engine.predict(scanner.schedule.model_input(x, step), t, rows)
            diff = out.to(torch.promote_types(out.dtype, torch.float32)) - uncond  # fp32 or wider
            loss = diff.flatten(1).norm(dim=1).sum() * scanner.score_scales[step]
            (grad,) = torch.autograd.grad(loss, e)
        total += grad.float().norm(dim=-1)
    return (total / len(states)).cpu().numpy()
