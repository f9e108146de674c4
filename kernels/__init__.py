"""Tensor kernels: tensors in, tensors out (imports torch and triton only).

Dispatch order of ``guidance_norm`` and ``guided_prediction``:
1. the native C++/CUDA op (``native.py``) when its library is built and has a kernel for
   the tensor's device (CPU always; CUDA when built against a CUDA torch), for fp32, fp16
   and bf16 inputs that need no gradient;
2. else Triton on CUDA tensors when triton is installed;
3. else the torch reference.
"""

from __future__ import annotations

import torch

from . import native
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
    if native.supports(cond, uncond):
        return native.guidance_norm_native(cond, uncond)
    if _use_triton(cond):
        return guidance_norm_triton(cond, uncond)
    return guidance_norm_reference(cond, uncond)


def guided_prediction(
    cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The norm and ``uncond + guidance_scale * (cond - uncond)``, in one pass where a fused kernel runs."""
    if native.supports(cond, uncond):
        return native.guided_prediction_native(cond, uncond, guidance_scale)
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
