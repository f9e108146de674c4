"""Tensor kernels: tensors in, tensors out (imports torch and triton only).

Dispatch: Triton on CUDA tensors when triton is installed, the torch reference otherwise
(CPU tensors). The native C++/CUDA op, when built, is tried first (see ``native.py``).
"""

from __future__ import annotations

import torch

from .fused_guidance import (
    guidance_norm_reference,
    guidance_norm_triton,
    guided_prediction_reference,
    guided_prediction_triton,
    triton,
)


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda and triton is not None


def guidance_norm(cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """Per-row ``||cond - uncond||_2`` (fp32, ``[B]``); ``uncond`` is ``[B, ...]`` or ``[1, ...]``."""
    if _use_triton(cond):
        return guidance_norm_triton(cond, uncond)
    return guidance_norm_reference(cond, uncond)


def guided_prediction(
    cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The norm and ``uncond + guidance_scale * (cond - uncond)``, in one pass on CUDA."""
    if _use_triton(cond):
        return guided_prediction_triton(cond, uncond, guidance_scale)
    return guided_prediction_reference(cond, uncond, guidance_scale)


__all__ = [
    "guidance_norm",
    "guided_prediction",
    "guidance_norm_reference",
    "guided_prediction_reference",
    "guidance_norm_triton",
    "guided_prediction_triton",
]
