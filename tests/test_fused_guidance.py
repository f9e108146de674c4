"""The fused norm kernels (Triton, under TRITON_INTERPRET=1 on the CPU) against float64 torch."""

from __future__ import annotations

import pytest
import torch

from scanner import kernels
from scanner.kernels import fused_guidance as gn

from guidance_cases import DTYPES, assert_guided_prediction_matches, assert_norm_matches, float64_norm, random_case

pytestmark = pytest.mark.skipif(gn.triton is None, reason="triton is not installed")

# Row lengths: not powers of two, shorter than a block, spanning several chunks.
SHAPES = [(1, (3, 5, 7)), (3, (1000,)), (5, (4, 33, 31)), (2, (gn.CHUNK + 17,)), (70, (13,))]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("broadcast", [False, True])
@pytest.mark.parametrize("rows,row_shape", SHAPES)
def test_norm_matches_float64(dtype, broadcast, rows, row_shape):
    cond, uncond = random_case(rows, row_shape, dtype, broadcast)
    assert_norm_matches(gn.guidance_norm_triton(cond, uncond), cond, uncond)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("broadcast", [False, True])
@pytest.mark.parametrize("rows,row_shape", SHAPES)
def test_guided_prediction_matches_float64(dtype, broadcast, rows, row_shape):
    # Every element written: the output starts as uninitialised memory, so a skipped
    # element would not match the float64 value.
    assert_guided_prediction_matches(gn.guided_prediction_triton, *random_case(rows, row_shape, dtype, broadcast))


def test_guided_output_overwrites_poison(monkeypatch):
    """Outputs pre-filled with NaN must come back fully written."""
    cond, uncond = random_case(4, (gn.CHUNK * 2 + 3,), torch.float16, broadcast=True)
    real_empty_like = torch.empty_like
    monkeypatch.setattr(gn.torch, "empty_like", lambda t, **kw: real_empty_like(t, **kw).fill_(float("nan")))
    real_empty = torch.empty
    monkeypatch.setattr(gn.torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan")))
    norm, guided = gn.guided_prediction_triton(cond, uncond, 7.5)
    assert not torch.isnan(guided).any() and not torch.isnan(norm).any()


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("broadcast", [False, True])
def test_references_match_float64(dtype, broadcast):
    cond, uncond = random_case(6, (4, 9, 9), dtype, broadcast)
    torch.testing.assert_close(kernels.guidance_norm_reference(cond, uncond).double(), float64_norm(cond, uncond), rtol=1e-6, atol=1e-6)
    # The guided values (and the norm beside them) against float64, at a random scale.
    assert_guided_prediction_matches(kernels.guided_prediction_reference, cond, uncond)


def test_dispatch_never_runs_triton_on_cpu(monkeypatch):
    monkeypatch.setattr(kernels, "guidance_norm_triton", lambda *a: pytest.fail("triton called on CPU"))
    cond, uncond = random_case(2, (10,), torch.float32, broadcast=False)
    torch.testing.assert_close(kernels.guidance_norm(cond, uncond), kernels.guidance_norm_reference(cond, uncond))


@pytest.mark.parametrize("bad", ["dtype", "shape"])
def test_rejects_mismatched_inputs(bad):
    cond = torch.randn(3, 8)
    uncond = torch.randn(3, 8, dtype=torch.float16) if bad == "dtype" else torch.randn(2, 8)
    with pytest.raises((TypeError, ValueError)):
        gn.guidance_norm_triton(cond, uncond)
