"""First-step throughput of a family-shaped denoiser per engine and batch size, and its share of peak.

    python bench/gpu_unet.py --out DIR [--shape sd15|sdxl|sd3] [--dtype fp16|bf16]   # CUDA
    python bench/gpu_unet.py --dry-run --out DIR [--shape ...]                       # CPU, tiny: checks this script

Shapes (real configs, random weights): `sd15` (UNet, latents 4 x 64 x 64, text 77 x 768),
`sdxl` (UNet with added conditions, 4 x 128 x 128, text 77 x 2048 and pooled 1280), `sd3`
(SD3-medium transformer, 16 x 128 x 128, joint sequence 333 x 4096 and pooled 2048), each
called through memscan's own family denoiser module. For each engine (torch, compile, onnx,
tensorrt; those that cannot start are listed with the reason) and batch size (largest
first, within a per-engine time budget): the median time of `engine.conditional_norm` on
`B` latents against a cached unconditional row, i.e. the scanner's first-step,
single-generation denoiser work per batch. Also: a reference-style forward (the batch of 2
per prompt), the denoiser's FLOPs per sample (torch's FlopCounterMode) and a measured
matrix-product peak, so each row reads as prompts/s, ratio to the reference and share of
peak. Writes `denoiser_SHAPE.json` and `.md` into --out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from scanner.benchmark import SD15_UNET
from scanner.engines import ENGINES, EngineUnavailable, create_engine
from scanner.families.sd3 import SD3Denoiser
from scanner.families.sdxl import SDXLUNetDenoiser
from scanner.families.stable_diffusion import UNetDenoiser

BATCHES = (128, 64, 32, 16, 8, 4, 2, 1)
TINY_UNET = {**SD15_UNET, "sample_size": 8, "block_out_channels": (32, 64), "cross_attention_dim": 32,
             "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
             "layers_per_block": 1}
# stabilityai/stable-diffusion-xl-base-1.0's unet/config.json (2.6B parameters).
SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280), "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
}
TINY_SDXL_UNET = {**SDXL_UNET, "sample_size": 8, "block_out_channels": (32, 64), "layers_per_block": 1,
                  "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"), "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
                  "transformer_layers_per_block": (1, 1), "attention_head_dim": (2, 4), "cross_attention_dim": 64,
                  "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 80}
# stabilityai/stable-diffusion-3-medium-diffusers' transformer/config.json (2B parameters).
SD3_TRANSFORMER = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536, "pooled_projection_dim": 2048,
    "out_channels": 16, "pos_embed_max_size": 192,
}
TINY_SD3_TRANSFORMER = {**SD3_TRANSFORMER, "sample_size": 8, "num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 4,
                        "joint_attention_dim": 32, "caption_projection_dim": 32, "pooled_projection_dim": 64, "pos_embed_max_size": 16}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def build_shape(shape: str, dry: bool, dtype: torch.dtype, device: torch.device, rows: int):
    """`(denoiser module, latents [rows, C, H, W], conditioning rows)` for a family shape, random weights."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(rows, *size, device=device, dtype=dtype)

    if shape == "sd15":
        config = TINY_UNET if dry else SD15_UNET
        module = UNetDenoiser(UNet2DConditionModel(**config))
        cond = {"encoder_hidden_states": rand(77, config["cross_attention_dim"])}
        latent = (4, config["sample_size"], config["sample_size"])
    elif shape == "sdxl":
        config = TINY_SDXL_UNET if dry else SDXL_UNET
        size = config["sample_size"] * 8  # the pipeline's default image size: six time ids from it
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=dtype, device=device)
        module = SDXLUNetDenoiser(UNet2DConditionModel(**config), time_ids)
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        cond = {"encoder_hidden_states": rand(77, config["cross_attention_dim"]), "text_embeds": rand(pooled)}
        latent = (4, config["sample_size"], config["sample_size"])
    else:
        config = TINY_SD3_TRANSFORMER if dry else SD3_TRANSFORMER
        module = SD3Denoiser(SD3Transformer2DModel(**config))
        cond = {"encoder_hidden_states": rand(77 + 256, config["joint_attention_dim"]), "pooled_projections": rand(config["pooled_projection_dim"])}
        latent = (config["in_channels"], config["sample_size"], config["sample_size"])
    module = module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return module, torch.randn(rows, *latent, device=device, dtype=dtype), cond


def rows_of(cond: dict, count: int) -> dict:
    """The first `count` rows of every conditioning entry."""
    return {k: v[:count] for k, v in cond.items()}


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


def flops_per_sample(denoiser, latent: torch.Tensor, t: torch.Tensor, cond: dict) -> int:
    """FLOPs of one denoiser forward on one sample, as torch's FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        denoiser(latent, t, **cond)
    return counter.get_total_flops()


def sweep(engine, batches, inputs, device, repeats: int, budget_s: float) -> tuple[list[dict], list[int]]:
    """prompts/s of `engine.conditional_norm` per batch size; batch sizes past the budget are skipped."""
    latents, t, cond, uncond = inputs
    rows, skipped, started = [], [], time.perf_counter()
    for batch in batches:
        if time.perf_counter() - started > budget_s:
            skipped.append(batch)
            continue
        x, e = latents[:batch], rows_of(cond, batch)
        with torch.inference_mode():
            seconds = median_seconds(lambda: engine.conditional_norm(x, t, e, uncond), device, repeats)
        rows.append({"batch": batch, "ms": seconds * 1e3, "prompts_per_s": batch / seconds})
    return rows, skipped


def main(argv: list[str] | None = None) -> int:
    """Run the sweep for every engine, write the table and JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--shape", choices=("sd15", "sdxl", "sd3"), default="sd15", help="the family shape (default sd15)")
    parser.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16", help="UNet dtype on the GPU (default fp16)")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated (default: all)")
    parser.add_argument("--budget", type=float, default=75.0, help="seconds per engine before batch sizes are skipped")
    parser.add_argument("--dry-run", action="store_true", help="CPU, fp32, a tiny denoiser, batch sizes 2 and 1")
    args = parser.parse_args(argv)
    dry = args.dry_run
    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else DTYPES[args.dtype]
    batches = (2, 1) if dry else BATCHES
    torch.manual_seed(0)
    denoiser, latents, cond = build_shape(args.shape, dry, dtype, device, batches[0])
    t = torch.tensor(981.0 if args.shape != "sd3" else 1000.0, device=device)
    with torch.inference_mode():
        uncond = denoiser(latents[:1], t, **rows_of(cond, 1))
        reference_s = median_seconds(lambda: denoiser(latents[:2], t, **rows_of(cond, 2)), device, 10)
    flops = flops_per_sample(denoiser, latents[:1], t, rows_of(cond, 1))
    peak = matmul_peak_tflops(torch.bfloat16 if not dry else torch.float32, device, 512 if dry else 8192)
    reference = 1 / reference_s  # prompts/s: one prompt per batch-of-2 forward
    results, skipped_engines = {}, {}
    cache = Path(tempfile.mkdtemp(prefix="memscan-gpu-check-"))
    for name in args.engines.split(","):
        try:
            engine = create_engine(name, denoiser, cache_dir=cache, cache_key=f"gpu-check-{args.shape}-{args.dtype}")
            rows, skipped = sweep(engine, batches, (latents, t, cond, uncond), device, 3 if dry else 10, args.budget)
        except (EngineUnavailable, RuntimeError) as exc:  # RuntimeError: a backend failing mid-run, e.g. out of memory
            skipped_engines[name] = str(exc).splitlines()[0]
            continue
        for row in rows:
            row["ratio_vs_reference"] = row["prompts_per_s"] / reference
            row["share_of_peak"] = row["prompts_per_s"] * flops / 1e12 / peak
        results[name] = {"rows": rows, "skipped_batches": skipped}
    title = f"CPU (dry run, tiny {args.shape})" if dry else f"{torch.cuda.get_device_name()}, {args.shape}-shaped denoiser, {args.dtype}"
    lines = [f"### First-step denoiser throughput per engine ({title})", "",
             f"Denoiser: {flops / 1e9:.2f} GFLOP per sample; measured {'bf16' if not dry else 'fp32'} matmul peak {peak:.1f} TFLOP/s; "
             f"reference-style forward (batch of 2 per prompt): {reference:.1f} prompts/s; torch {torch.__version__}", "",
             "| engine | batch | ms | prompts/s | vs reference | share of peak |", "| --- | --- | --- | --- | --- | --- |"]
    for name, result in results.items():
        lines += [f"| {name} | {r['batch']} | {r['ms']:.1f} | {r['prompts_per_s']:.1f} | {r['ratio_vs_reference']:.1f}x | "
                  f"{r['share_of_peak']:.0%} |" for r in result["rows"]]
        if result["skipped_batches"]:
            lines.append(f"| {name} | {result['skipped_batches']} | skipped: over the {args.budget:.0f} s budget | | | |")
    lines += [f"| {name} | - | unavailable: {reason} | | | |" for name, reason in skipped_engines.items()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"denoiser_{args.shape}.md").write_text("\n".join(lines) + "\n")
    (args.out / f"denoiser_{args.shape}.json").write_text(json.dumps(
        {"device": title, "shape": args.shape, "flops_per_sample": flops, "matmul_peak_tflops": peak, "reference_prompts_per_s": reference,
         "engines": results, "unavailable": skipped_engines, "torch": torch.__version__}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
