"""On a CUDA machine: the native CUDA op against the Triton kernel, timed and cross-checked.

    python bench/gpu_native_vs_triton.py

Prints one row per (dtype, B x N, norm or guided): both times (triton.testing.do_bench,
median) and their ratio, after checking that the two outputs agree. Exits non-zero when
there is no GPU, no native CUDA kernel, or the outputs disagree. Called by bench/gpu_check.sh.
"""

from __future__ import annotations

import torch

from scanner.kernels import fused_guidance, native

SHAPES = [(1, 16384), (8, 16384), (64, 16384), (256, 16384), (16, 4 * 128 * 128)]
DTYPES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
GUIDANCE_SCALE = 7.5


def implementations(guided: bool):
    """(native, triton) callables of one variant, both returning (norm, guided or None)."""
    if guided:
        return (
            lambda c, u: native.guided_prediction_native(c, u, GUIDANCE_SCALE),
            lambda c, u: fused_guidance.guided_prediction_triton(c, u, GUIDANCE_SCALE),
        )
    return (
        lambda c, u: (native.guidance_norm_native(c, u), None),
        lambda c, u: (fused_guidance.guidance_norm_triton(c, u), None),
    )


def compare(dtype: torch.dtype, rows: int, cols: int, guided: bool) -> tuple[float, float]:
    """Median milliseconds of (native, triton) after checking that their outputs agree."""
    from triton.testing import do_bench

    cond = torch.randn(rows, cols, device="cuda").to(dtype)
    uncond = torch.randn(1, cols, device="cuda").to(dtype)
    native_fn, triton_fn = implementations(guided)
    (native_norm, native_guided), (triton_norm, triton_guided) = native_fn(cond, uncond), triton_fn(cond, uncond)
    torch.testing.assert_close(native_norm, triton_norm, rtol=1e-5, atol=1e-5)
    if guided:
        torch.testing.assert_close(native_guided, triton_guided, rtol=DTYPES[dtype], atol=DTYPES[dtype] * 10)
    native_ms = do_bench(lambda: native_fn(cond, uncond), return_mode="median")
    triton_ms = do_bench(lambda: triton_fn(cond, uncond), return_mode="median")
    return native_ms, triton_ms


def main() -> None:
    """Print the table; fail without a GPU or a native CUDA kernel."""
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    if not native.has_native_kernel(torch.device("cuda")):
        raise SystemExit(f"no native CUDA kernel ({native.load_failure or 'library built without CUDA'})")
    print(f"{torch.cuda.get_device_name()}: native CUDA op vs Triton (median ms, do_bench)")
    print(f"{'dtype':>9} {'B x N':>14} {'variant':>7} {'native':>8} {'triton':>8} {'triton/native':>14}")
    for dtype in DTYPES:
        for rows, cols in SHAPES:
            for guided in (False, True):
                native_ms, triton_ms = compare(dtype, rows, cols, guided)
                case = f"{str(dtype)[6:]:>9} {f'{rows} x {cols}':>14} {'guided' if guided else 'norm':>7}"
                print(f"{case} {native_ms:>8.4f} {triton_ms:>8.4f} {triton_ms / native_ms:>13.2f}x")


if __name__ == "__main__":
    main()
