"""The fused norm kernel's bandwidth as a share of a measured device-to-device copy.

    python bench/gpu_kernel_bandwidth.py --out DIR       # CUDA: Triton kernel (and native, if built)
    python bench/gpu_kernel_bandwidth.py --dry-run       # CPU, small sizes: checks this script

For B x 16384 rows (one 4 x 64 x 64 latent each) against a broadcast `[1, 16384]` uncond:
checks each implementation against the torch reference, then reports GB/s (bytes read:
B x N + N elements) and that as a share of `dst.copy_(src)` (bytes read + written). The
target is 80% of the copy at B >= 64. Writes `kernel_bandwidth.json` and `.md` into --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from scanner.kernels import guidance_norm_reference, native
from scanner.kernels.fused_guidance import guidance_norm_triton

COLS = 16384
ROWS = (1, 8, 64, 256, 1024)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def median_seconds(fn, device: torch.device, repeats: int = 50) -> float:
    """Median wall seconds of `fn()`, synchronized on CUDA (triton's do_bench where available)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """GB/s of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / median_seconds(lambda: dst.copy_(src), device) / 1e9


def implementations(device: torch.device) -> dict:
    """The kernels that run on `device`, by name."""
    found = {}
    if device.type == "cuda":
        found["triton"] = guidance_norm_triton
    if native.has_native_kernel(device):
        found["native"] = native.guidance_norm_native
    return found


def main(argv: list[str] | None = None) -> int:
    """Measure, check and write the table; non-zero exit when an output disagrees."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for kernel_bandwidth.json/.md")
    parser.add_argument("--dry-run", action="store_true", help="CPU, small sizes")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.dry_run else "cuda")
    rows_list = (1, 64) if args.dry_run else ROWS
    copy_gbps = copy_bandwidth(device, (16 << 20) if args.dry_run else (1 << 30))
    kernels = implementations(device) or {"torch reference": guidance_norm_reference}
    results, failures = [], []
    for name, kernel in kernels.items():
        for dtype in DTYPES:
            for rows in rows_list:
                cond = torch.randn(rows, COLS, device=device).to(dtype)
                uncond = torch.randn(1, COLS, device=device).to(dtype)
                try:
                    torch.testing.assert_close(kernel(cond, uncond), guidance_norm_reference(cond, uncond), rtol=1e-4, atol=1e-4)
                except AssertionError as exc:
                    failures.append(f"{name} {dtype} {rows}: {str(exc).splitlines()[0]}")
                seconds = median_seconds(lambda: kernel(cond, uncond), device)
                gbps = (rows + 1) * COLS * cond.element_size() / seconds / 1e9
                results.append(
                    {"kernel": name, "dtype": str(dtype)[6:], "rows": rows, "cols": COLS, "us": seconds * 1e6,
                     "gb_per_s": gbps, "share_of_copy": gbps / copy_gbps}
                )
    title = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (dry run)"
    lines = [f"### Fused norm kernel vs device copy ({title}; copy {copy_gbps:.0f} GB/s read+write)", "",
             "| kernel | dtype | B x N | us | GB/s | share of copy |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['kernel']} | {r['dtype']} | {r['rows']} x {r['cols']} | {r['us']:.1f} | {r['gb_per_s']:.0f} | "
              f"{r['share_of_copy']:.0%} |" for r in results]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernel_bandwidth.md").write_text("\n".join(lines) + "\n")
    (args.out / "kernel_bandwidth.json").write_text(
        json.dumps({"device": title, "copy_gb_per_s": copy_gbps, "results": results, "parity_failures": failures}, indent=2)
    )
    print("\n".join(lines))
    for failure in failures:
        print(f"PARITY FAILURE: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
