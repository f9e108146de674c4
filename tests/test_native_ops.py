"""The native ops (C++ on the CPU) against float64 torch; skipped where the library is not built."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from scanner import kernels
from scanner.kernels import native

from guidance_cases import DTYPES, assert_guided_prediction_matches, assert_norm_matches, random_case

needs_native = pytest.mark.skipif(not native.load_native_ops(), reason=f"native ops not built: {native.load_failure}")

CPU_CHUNK = 16384  # kChunk of kernels/csrc/fused_guidance_types.h

# Row lengths not powers of two; B = 1; B above the thread count; rows over several chunks.
SHAPES = [
    (1, (3, 5, 7)),
    (3, (1000,)),
    (5, (4, 33, 31)),
    (2, (CPU_CHUNK + 17,)),
    (70, (13,)),
    (1, (3 * CPU_CHUNK + 5,)),
]


@pytest.fixture(autouse=True)
def poisoned_empty():
    """While on, torch fills new tensors (at::empty in C++ too) with NaN: unwritten outputs show."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.utils.deterministic.fill_uninitialized_memory = fill


def _has_native_cuda() -> bool:
    return torch.cuda.is_available() and native.has_native_kernel(torch.device("cuda"))


DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not _has_native_cuda(), reason="no native CUDA kernel")]
    ),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Each device with a native kernel: the CPU, and CUDA where built and present."""
    return request.param


@pytest.fixture(params=[(d, b, r, s) for d in DTYPES for b in (False, True) for r, s in SHAPES], ids=str)
def case(request, device):
    """A random (cond, uncond) of each dtype x broadcast or not x shape, on each device."""
    dtype, broadcast, rows, row_shape = request.param
    return tuple(t.to(device) for t in random_case(rows, row_shape, dtype, broadcast))


@needs_native
def test_norm_matches_float64(case):
    assert_norm_matches(native.guidance_norm_native(*case), *case)


@needs_native
def test_guided_prediction_matches_float64(case):
    assert_guided_prediction_matches(native.guided_prediction_native, *case)


@needs_native
def test_non_contiguous_and_expanded_inputs():
    cond, uncond = random_case(6, (9, 40), torch.float32, broadcast=True)
    cond_t = cond.transpose(1, 2)  # rows of the transposed view, not of the storage
    uncond_b = uncond.transpose(1, 2).expand(6, -1, -1)  # stride 0 over the batch
    assert_norm_matches(native.guidance_norm_native(cond_t, uncond_b), cond_t, uncond_b)


@needs_native
def test_thread_count_does_not_change_results():
    cond, uncond = random_case(8, (3 * CPU_CHUNK + 1,), torch.float32, broadcast=False)
    many = max(2, os.cpu_count() or 1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.get_num_threads() == 1
        one_thread = native.guidance_norm_native(cond, uncond)
        torch.set_num_threads(many)
        assert torch.get_num_threads() == many
        many_threads = native.guidance_norm_native(cond, uncond)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one_thread, many_threads), f"1 vs {many} threads"
    assert_norm_matches(many_threads, cond, uncond)


@needs_native
def test_empty_batch():
    cond, uncond = random_case(0, (4, 5), torch.float16, broadcast=False)
    norm, guided = native.guided_prediction_native(cond, uncond, 2.0)
    assert norm.shape == (0,) and guided.shape == cond.shape


@needs_native
@pytest.mark.parametrize(
    "uncond,error",
    [
        (torch.ones(3, 8, dtype=torch.float16), TypeError),  # dtype differs from cond's
        (torch.ones(3, 9), ValueError),  # row shape differs
        (torch.ones(2, 8), ValueError),  # neither B nor 1 rows
    ],
)
def test_rejects_mismatched_inputs(uncond, error):
    with pytest.raises(error):
        native.guidance_norm_native(torch.randn(3, 8), uncond)


@needs_native
def test_rejects_float64():
    with pytest.raises(TypeError):
        native.guidance_norm_native(torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64))


@needs_native
def test_dispatch_prefers_native_on_cpu(monkeypatch):
    monkeypatch.setattr(native, "guidance_norm_native", lambda *a: "native")
    monkeypatch.setattr(native, "guided_prediction_native", lambda *a: "native")
    cond, uncond = random_case(2, (10,), torch.bfloat16, broadcast=True)
    assert kernels.guidance_norm(cond, uncond) == "native"
    assert kernels.guided_prediction(cond, uncond, 3.0) == "native"


@needs_native
def test_dispatch_leaves_gradients_and_float64_to_the_reference():
    cond, uncond = random_case(2, (10,), torch.float32, broadcast=False)
    cond.requires_grad_(True)
    upstream = torch.randn(2)
    (kernels.guidance_norm(cond, uncond) * upstream).sum().backward()
    # Closed form in float64: d||c - u|| / dc = (c - u) / ||c - u||, per row, times the upstream gradient.
    diff = cond.detach().double() - uncond.double()
    expected = diff / diff.norm(dim=1, keepdim=True) * upstream.double()[:, None]
    torch.testing.assert_close(cond.grad.double(), expected, rtol=1e-5, atol=1e-6)
    double = random_case(2, (10,), torch.float64, broadcast=False)  # the native op rejects float64
    torch.testing.assert_close(kernels.guidance_norm(*double), kernels.guidance_norm_reference(*double))


def test_failed_load_is_a_quiet_false(monkeypatch, tmp_path):
    broken = tmp_path / native.LIBRARY_NAME
    broken.write_text("not a shared library")
    monkeypatch.setenv("MEMSCAN_NATIVE_LIB", str(broken))
    native.load_native_ops.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert native.load_native_ops() is False
        assert str(broken) in native.load_failure
        with pytest.raises(RuntimeError, match="not available"):
            native.guidance_norm_native(torch.ones(1, 2), torch.ones(1, 2))
    finally:
        monkeypatch.undo()
        native.load_native_ops.cache_clear()
        native.load_native_ops()
