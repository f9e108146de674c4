"""The fused norm kernel against `(c - u).norm(dim=1)` in torch, on CUDA (skipped elsewhere).

    python -m pytest bench/bench_gpu_kernel.py --benchmark-enable
"""

from __future__ import annotations

import pytest
import torch

from scanner.kernels import guidance_norm

COLS = 16384  # one 4 x 64 x 64 latent
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def torch_norm(cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """What the kernel replaces: a temporary difference, then a second pass."""
    return (cond.float() - uncond.float()).norm(dim=1)


@pytest.mark.parametrize("rows", [64, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("implementation", ["fused", "torch"])
def test_norm_speed(benchmark, implementation, dtype, rows):
    benchmark.group = f"{rows} x {COLS} {str(dtype)[6:]}"
    cond = torch.randn(rows, COLS, device="cuda").to(dtype)
    uncond = torch.randn(1, COLS, device="cuda").to(dtype)
    fn = guidance_norm if implementation == "fused" else torch_norm

    def run():
        out = fn(cond, uncond)
        torch.cuda.synchronize()
        return out

    torch.testing.assert_close(run(), torch_norm(cond, uncond), rtol=1e-4, atol=1e-4)
    benchmark(run)
