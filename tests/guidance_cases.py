"""Random cases and float64 checks shared by the tests of every fused-norm implementation."""

from __future__ import annotations

import torch

# Tolerance of a guided value rounded to each dtype (relative; x10 absolute near zero).
DTYPES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def random_case(rows: int, row_shape: tuple[int, ...], dtype: torch.dtype, broadcast: bool):
    """``cond [rows, *row_shape]`` and ``uncond`` (``[1, ...]`` when broadcast), never zero."""
    cond = torch.randn(rows, *row_shape, dtype=torch.float64).to(dtype)
    uncond = torch.randn(1 if broadcast else rows, *row_shape, dtype=torch.float64).to(dtype)
    return cond, uncond


def float64_norm(cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """Per-row ``||cond - uncond||_2`` in float64."""
    return (cond.double() - uncond.double()).flatten(1).norm(dim=1)


def assert_norm_matches(norm: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor) -> None:
    """``norm`` is fp32 ``[B]`` and matches the float64 norm."""
    assert norm.dtype == torch.float32 and norm.shape == (cond.shape[0],)
    torch.testing.assert_close(norm.double(), float64_norm(cond, uncond), rtol=1e-5, atol=1e-5)


def assert_guided_prediction_matches(guided_prediction, cond: torch.Tensor, uncond: torch.Tensor) -> None:
    """``guided_prediction(cond, uncond, w)`` matches float64 for a random ``w`` in [1, 10]."""
    scale = float(torch.empty(()).uniform_(1.0, 10.0))
    norm, guided = guided_prediction(cond, uncond, scale)
    expected = uncond.double() + scale * (cond.double() - uncond.double())
    assert guided.dtype == cond.dtype and guided.shape == cond.shape
    tolerance = DTYPES[cond.dtype]
    torch.testing.assert_close(
        guided.double(), expected.to(cond.dtype).double(), rtol=tolerance, atol=tolerance * 10,
        msg=lambda message: f"{message}\nguidance scale {scale!r}",
    )
    assert_norm_matches(norm, cond, uncond)
