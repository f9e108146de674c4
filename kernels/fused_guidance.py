"""Fused conditional-minus-unconditional L2 norm, with an optional guided prediction.

For a batch of conditional predictions ``cond`` of shape ``[B, ...]`` and unconditional
predictions ``uncond`` of shape ``[B, ...]`` or ``[1, ...]`` (broadcast over the batch),

    norm[b]   = || cond[b] - uncond[b or 0] ||_2          (fp32 accumulation)
    guided[b] = uncond[b or 0] + w * (cond[b] - uncond[b or 0])   (input dtype, optional)

in one pass over the inputs and without materialising the difference. Inputs are fp16,
bf16 or fp32 (both the same dtype); ``norm`` is fp32 of shape ``[B]``; ``guided`` has the
shape and dtype of ``cond``.

Layout: a kernel, its launcher, its torch reference; tests in ``tests/test_fused_guidance.py``;
benchmarks in ``bench/bench_gpu_kernel.py`` (against torch), ``bench/gpu_kernel_bandwidth.py``
(share of copy bandwidth) and ``bench/gpu_native_vs_triton.py`` (against the native CUDA op).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional off Linux; dispatch then uses the reference
    triton = None

# Elements each program reduces: rows are split into chunks so that a small batch of long
# rows (B = 1..64 rows of 4 x 64 x 64) still fills every SM; partial sums are then added.
CHUNK = 4096
BLOCK = 1024


def guidance_norm_reference(cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """Torch reference: per-row ``||cond - uncond||_2`` in fp32, shape ``[B]``."""
    diff = cond.float() - uncond.float()
    return diff.flatten(1).norm(dim=1)


def guided_prediction_reference(
    cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: ``(norm [B] fp32, uncond + w * (cond - uncond) in cond's dtype)``."""
    diff = cond.float() - uncond.float()
    guided = uncond.float() + guidance_scale * diff
    return diff.flatten(1).norm(dim=1), guided.to(cond.dtype)


if triton is not None:

    @triton.jit
    def _guidance_norm_kernel(
        cond_ptr,
        uncond_ptr,
        guided_ptr,
        partial_ptr,
        n_cols,
        uncond_row_stride,
        num_chunks,
        guidance_scale,
        WRITE_GUIDED: tl.constexpr,
        CHUNK: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        row_start = row.to(tl.int64) * n_cols
        uncond_start = row.to(tl.int64) * uncond_row_stride
        offsets = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(chunk * CHUNK, chunk * CHUNK + CHUNK, BLOCK):
            cols = start + offsets
            mask = cols < n_cols
            c = tl.load(cond_ptr + row_start + cols, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(uncond_ptr + uncond_start + cols, mask=mask, other=0.0).to(tl.float32)
            d = c - u
            acc += d * d
            if WRITE_GUIDED:
                g = u + guidance_scale * d
                tl.store(guided_ptr + row_start + cols, g.to(guided_ptr.dtype.element_ty), mask=mask)
        tl.store(partial_ptr + row * num_chunks + chunk, tl.sum(acc, axis=0))


def _launch(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float | None):
    if cond.dtype != uncond.dtype:
        raise TypeError(f"cond and uncond must share a dtype, got {cond.dtype} and {uncond.dtype}")
    if uncond.shape[1:] != cond.shape[1:] or uncond.shape[0] not in (1, cond.shape[0]):
        raise ValueError(f"uncond {tuple(uncond.shape)} does not match cond {tuple(cond.shape)} or broadcast [1, ...]")
    rows = cond.shape[0]
    cond_rows = cond.reshape(rows, -1).contiguous()
    uncond_rows = uncond.reshape(uncond.shape[0], -1).contiguous()
    n_cols = cond_rows.shape[1]
    num_chunks = triton.cdiv(n_cols, CHUNK)
    partial = torch.empty((rows, num_chunks), dtype=torch.float32, device=cond.device)
    write_guided = guidance_scale is not None
    guided = torch.empty_like(cond_rows) if write_guided else cond_rows  # unused pointer when not written
    _guidance_norm_kernel[(rows, num_chunks)](
        cond_rows,
        uncond_rows,
        guided,
        partial,
        n_cols,
        0 if uncond.shape[0] == 1 else n_cols,
        num_chunks,
        float(guidance_scale or 0.0),
        WRITE_GUIDED=write_guided,
        CHUNK=CHUNK,
        BLOCK=BLOCK,
    )
    norm = partial.sum(dim=1).sqrt()
    return norm, guided.view(cond.shape) if write_guided else None


def guidance_norm_triton(cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """Triton launcher: per-row ``||cond - uncond||_2`` in fp32, shape ``[B]``."""
    return _launch(cond, uncond, None)[0]


def guided_prediction_triton(
    cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher: the norm and the guided prediction ``uncond + w * (cond - uncond)``."""
    return _launch(cond, uncond, guidance_scale)
