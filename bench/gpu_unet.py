"""First-step throughput of an SD 1.5-shaped UNet per engine and batch size, and its share of peak.

    python bench/gpu_unet.py --out DIR [--dtype fp16|bf16]   # CUDA
    python bench/gpu_unet.py --dry-run --out DIR             # CPU, tiny UNet: checks this script

For each engine (torch, compile, onnx, tensorrt; those that cannot start are listed with
the reason) and batch size (largest first, within a per-engine time budget): the median
time of `engine.conditional_norm` on `B` latents 4 x 64 x 64 and text 77 x 768 against a
cached unconditional row, i.e. the scanner's first-step, single-generation UNet work per
batch. Also: a reference-style forward (the batch of 2 per prompt), the UNet's FLOPs per
sample (torch's FlopCounterMode) and a measured matrix-product peak in the same dtype, so
each row reads as prompts/s, ratio to the reference and share of peak. Writes
`unet_throughput.json` and `.md` into --out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from scanner.benchmark import SD15_UNET, random_unet
from scanner.engines import ENGINES, EngineUnavailable, create_engine

BATCHES = (128, 64, 32, 16, 8, 4, 2, 1)
TINY_UNET = {**SD15_UNET, "sample_size": 8, "block_out_channels": (32, 64), "cross_attention_dim": 32,
             "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
             "layers_per_block": 1}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def median_seconds(fn, device: torch.device, repeats: int) -> float:
    """Median wall seconds of `fn()` after one warm-up call, synchronized on CUDA."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def matmul_peak_tflops(dtype: torch.dtype, device: torch.device, n: int) -> float:
    """Measured TFLOP/s of an n x n x n matrix product in `dtype`."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / median_seconds(lambda: a @ b, device, repeats=20) / 1e12


def unet_flops_per_sample(unet, latent: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> int:
    """FLOPs of one UNet forward on one sample, as torch's FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(latent, t, encoder_hidden_states=text)
    return counter.get_total_flops()


def sweep(engine, batches, inputs, device, repeats: int, budget_s: float) -> tuple[list[dict], list[int]]:
    """prompts/s of `engine.conditional_norm` per batch size; batch sizes past the budget are skipped."""
    latents, t, text, uncond = inputs
    rows, skipped, started = [], [], time.perf_counter()
    for batch in batches:
        if time.perf_counter() - started > budget_s:
            skipped.append(batch)
            continue
        x, e = latents[:batch], text[:batch]
        with torch.inference_mode():
            seconds = median_seconds(lambda: engine.conditional_norm(x, t, e, uncond), device, repeats)
        rows.append({"batch": batch, "ms": seconds * 1e3, "prompts_per_s": batch / seconds})
    return rows, skipped


def main(argv: list[str] | None = None) -> int:
    """Run the sweep for every engine, write the table and JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16", help="UNet dtype on the GPU (default fp16)")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated (default: all)")
    parser.add_argument("--budget", type=float, default=75.0, help="seconds per engine before batch sizes are skipped")
    parser.add_argument("--dry-run", action="store_true", help="CPU, fp32, a tiny UNet, batch sizes 2 and 1")
    args = parser.parse_args(argv)
    dry = args.dry_run
    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else DTYPES[args.dtype]
    batches = (2, 1) if dry else BATCHES
    config = TINY_UNET if dry else SD15_UNET
    torch.manual_seed(0)
    unet = random_unet(config, dtype, device)
    size, width = config["sample_size"], config["cross_attention_dim"]
    t = torch.tensor(981, device=device)
    latents = torch.randn(batches[0], 4, size, size, device=device, dtype=dtype)
    text = torch.randn(batches[0], 77, width, device=device, dtype=dtype)
    with torch.inference_mode():
        uncond = unet(latents[:1], t, encoder_hidden_states=text[:1]).sample
        reference_s = median_seconds(lambda: unet(latents[:2], t, encoder_hidden_states=text[:2]).sample, device, 10)
    flops = unet_flops_per_sample(unet, latents[:1], t, text[:1])
    peak = matmul_peak_tflops(torch.bfloat16 if not dry else torch.float32, device, 512 if dry else 8192)
    reference = 1 / reference_s  # prompts/s: one prompt per batch-of-2 forward
    results, skipped_engines = {}, {}
    cache = Path(tempfile.mkdtemp(prefix="memscan-gpu-check-"))
    for name in args.engines.split(","):
        try:
            engine = create_engine(name, unet, cache_dir=cache, cache_key=f"gpu-check-{args.dtype}")
            rows, skipped = sweep(engine, batches, (latents, t, text, uncond), device, 3 if dry else 10, args.budget)
        except (EngineUnavailable, RuntimeError) as exc:  # RuntimeError: a backend failing mid-run, e.g. out of memory
            skipped_engines[name] = str(exc).splitlines()[0]
            continue
        for row in rows:
            row["ratio_vs_reference"] = row["prompts_per_s"] / reference
            row["share_of_peak"] = row["prompts_per_s"] * flops / 1e12 / peak
        results[name] = {"rows": rows, "skipped_batches": skipped}
    title = "CPU (dry run, tiny UNet)" if dry else f"{torch.cuda.get_device_name()}, SD 1.5-shaped UNet, {args.dtype}"
    lines = [f"### First-step UNet throughput per engine ({title})", "",
             f"UNet: {flops / 1e9:.2f} GFLOP per sample; measured {'bf16' if not dry else 'fp32'} matmul peak {peak:.1f} TFLOP/s; "
             f"reference-style forward (batch of 2 per prompt): {reference:.1f} prompts/s; torch {torch.__version__}", "",
             "| engine | batch | ms | prompts/s | vs reference | share of peak |", "| --- | --- | --- | --- | --- | --- |"]
    for name, result in results.items():
        lines += [f"| {name} | {r['batch']} | {r['ms']:.1f} | {r['prompts_per_s']:.1f} | {r['ratio_vs_reference']:.1f}x | "
                  f"{r['share_of_peak']:.0%} |" for r in result["rows"]]
        if result["skipped_batches"]:
            lines.append(f"| {name} | {result['skipped_batches']} | skipped: over the {args.budget:.0f} s budget | | | |")
    lines += [f"| {name} | - | unavailable: {reason} | | | |" for name, reason in skipped_engines.items()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "unet_throughput.md").write_text("\n".join(lines) + "\n")
    (args.out / "unet_throughput.json").write_text(json.dumps(
        {"device": title, "flops_per_sample": flops, "matmul_peak_tflops": peak, "reference_prompts_per_s": reference,
         "engines": results, "unavailable": skipped_engines, "torch": torch.__version__}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
