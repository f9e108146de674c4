"""The native CPU op against torch's ``(c - u).norm(dim=1)`` on B x 16384 fp32.

pytest (side by side in pytest-benchmark's table; addopts disables benchmarks):
    python -m pytest bench/bench_native.py --benchmark-enable
or the ratio alone:
    python bench/bench_native.py
"""

from __future__ import annotations

import time

import pytest
import torch

from scanner.kernels import native

COLS = 16384  # one 4 x 64 x 64 latent
BATCHES = (64, 256)


def torch_norm(cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """What the native op replaces: a temporary difference, then a second pass."""
    return (cond - uncond).norm(dim=1)


def make_inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random B x 16384 fp32 cond and uncond (uncond not broadcast)."""
    return torch.randn(batch, COLS), torch.randn(batch, COLS)


def interleaved_medians(fns, cond: torch.Tensor, uncond: torch.Tensor, repeats: int = 100) -> list[float]:
    """Median wall seconds of each ``fn(cond, uncond)``, timed in turn so that load from
    other processes falls on all of them alike."""
    times = [[] for _ in fns]
    for fn in fns:
        fn(cond, uncond)  # warm-up
    for _ in range(repeats):
        for fn, fn_times in zip(fns, times):
            start = time.perf_counter()
            fn(cond, uncond)
            fn_times.append(time.perf_counter() - start)
    return [sorted(fn_times)[repeats // 2] for fn_times in times]


@pytest.mark.skipif(not native.load_native_ops(), reason=f"native ops not built: {native.load_failure}")
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("implementation", ["native", "torch"])
def test_norm_speed(benchmark, implementation, batch):
    benchmark.group = f"{batch} x {COLS} fp32, {torch.get_num_threads()} threads"
    fn = native.guidance_norm_native if implementation == "native" else torch_norm
    benchmark(fn, *make_inputs(batch))


def main() -> None:
    """Print the median times of both and the speed-up, per thread count and batch size."""
    if not native.load_native_ops():
        raise SystemExit(f"native ops not built: {native.load_failure}")
    threads = torch.get_num_threads()
    print(f"B x {COLS} fp32, median of 100 calls each, interleaved")
    print(f"{'threads':>7} {'B':>5} {'native ms':>10} {'torch ms':>10} {'speed-up':>9}")
    for thread_count in sorted({1, threads}):
        torch.set_num_threads(thread_count)
        for batch in BATCHES:
            cond, uncond = make_inputs(batch)
            native_s, torch_s = interleaved_medians([native.guidance_norm_native, torch_norm], cond, uncond)
            times = f"{native_s * 1e3:>10.3f} {torch_s * 1e3:>10.3f}"
            print(f"{thread_count:>7} {batch:>5} {times} {torch_s / native_s:>8.2f}x")
    torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
