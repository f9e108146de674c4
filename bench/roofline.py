"""The testbed's scoring loop against this CPU's fp32 roofline: FLOPs per prompt and the measured matmul peak.

Shared by bench/whole_process.py and bench/batch_size.py. A prompt's FLOPs are one text-encoder row and
one conditional UNet row at the first step (the unconditional row is cached), counted by
`torch.utils.flop_counter` with attention on torch's math backend (the counter does not count its
fused CPU kernel); the peak is the best fp32 rate of large square matmuls, torch's and numpy's BLAS,
on the scan's thread count.
"""

from __future__ import annotations

import time
from pathlib import Path

MODEL = Path(__file__).resolve().parents[1] / "scanner" / "data" / "testbed"


def flops_per_prompt() -> float:
    """FLOPs of one prompt's text-encoder row plus its conditional UNet row at the first step (batch of 16, divided)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from scanner.detect import DetectSettings, Scanner
    from scanner.model import load_model

    scanner = Scanner(load_model(MODEL, device="cpu"), DetectSettings())
    prompts = [f"a photo of thing {i}" for i in range(16)]
    scanner.score(prompts[:1])  # the cached unconditional row: not part of the per-prompt cost
    # torch's counter has no formula for the CPU's fused attention kernel and counts it as 0 FLOPs;
    # the math backend's bmm calls it counts (8.0 of the testbed's 78.7 MFLOP).
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        scanner.score(prompts[1:] + ["another prompt"])
    return counter.get_total_flops() / 16


def matmul_peak(threads: int) -> float:
    """Best fp32 GFLOP/s of 1024- and 2048-square matmuls, torch's and numpy's, on `threads` threads."""
    import numpy as np
    import torch
    from threadpoolctl import threadpool_limits  # scikit-learn's dependency

    torch.set_num_threads(threads)
    best = 0.0
    with threadpool_limits(threads, user_api="blas"):  # numpy's BLAS on the same threads as torch
        for size in (1024, 2048):
            flops = 2 * size**3
            for a, b in ((torch.randn(size, size), torch.randn(size, size)),
                         (np.random.rand(size, size).astype(np.float32), np.random.rand(size, size).astype(np.float32))):
                for _ in range(10):
                    began = time.perf_counter()
                    a @ b
                    best = max(best, flops / (time.perf_counter() - began) / 1e9)
    return best
