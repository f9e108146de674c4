"""Whole processes side by side: `memscan scan` against a plain diffusers loop, and the scoring loop against the roofline.

    python bench/whole_process.py --prompts 512 --rounds 3 [--long 20000] [--json F]

- Whole process: `memscan scan` of N testbed-style prompts (default environment, default options)
  against a plain diffusers script that loads the same `StableDiffusionPipeline` and scores one
  prompt at a time, `[uncond, cond]` in one UNet batch of 2 (`--plain`, this file; it imports
  nothing from memscan). memscan runs with a fresh cache: its first scan compiles the scan plan
  (timed and reported on its own), the rounds' scans use it. Rounds interleave the two; the
  ratio is each round's wall time over the other's, then the median. The scores of both are compared.
- Roofline: FLOPs per prompt of the scoring loop (bench/roofline.py) times the scoring rate
  `memscan scan` reports over its whole run, against the fp32 matmul peak measured here on the
  same threads: for the rounds' short scans (start-up and the first batch's warm-up included),
  and for one long scan (`--long`, 20,000 more distinct prompts), nearly the steady loop (its
  start-up and merge are about 6% of it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from roofline import MODEL, flops_per_prompt, matmul_peak  # bench/, beside this file


def plain_loop(model: str, prompts_file: str, out: str) -> None:
    """Score each prompt as a diffusers user would write it: first DDIM step of 50, seed 0, ||eps_c - eps_u||."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(50)
    t = scheduler.timesteps[0]
    shape = (1, pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    latent = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    x = scheduler.scale_model_input(torch.cat([latent, latent]), t)
    prompts = Path(prompts_file).read_text(encoding="utf-8").splitlines()
    with torch.inference_mode(), open(out, "w", encoding="utf-8") as f:
        for prompt in prompts:
            cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, do_classifier_free_guidance=True)
            eps = pipe.unet(x, t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            f.write(json.dumps({"prompt": prompt, "score": float((eps[1] - eps[0]).norm())}) + "\n")


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, str]:
    """Wall seconds and stdout of one process in the default environment (or `env`)."""
    began = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return time.perf_counter() - began, done.stdout


def summary_rate(stdout: str) -> float:
    """The prompts/s of `memscan scan`'s summary line."""
    found = re.search(r"([\d.]+) prompts/s", stdout)
    if found is None:
        raise SystemExit(f"no prompts/s in memscan scan's output: {stdout[-500:]!r}")
    return float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--long", type=int, default=20000,
                        help="then one scan of this many prompts, whose rate is the scan's steady scoring loop (0: none)")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--plain", nargs=3, metavar=("MODEL", "PROMPTS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain:
        return plain_loop(*args.plain)

    from scanner.benchmark import sample_prompts
    from scanner.threads import current_threads

    walls: dict[str, list[float]] = {"memscan scan": [], "plain diffusers loop": []}
    rates, loads = [], []
    with tempfile.TemporaryDirectory() as folder:
        prompts = Path(folder) / "prompts.txt"
        prompts.write_text("\n".join(sample_prompts(args.prompts)) + "\n", encoding="utf-8")
        env = {**os.environ, "MEMSCAN_CACHE": str(Path(folder) / "cache")}  # the environment otherwise as it is

        def scan(out: Path, inputs: Path = prompts) -> tuple[float, str]:
            return timed([sys.executable, "-m", "scanner.cli", "scan", str(inputs), "--out", str(out)], env)

        first = scan(Path(folder) / "first.jsonl")[0]
        print(f"first memscan scan (compiles the scan plan): {first:.1f} s", file=sys.stderr, flush=True)
        for round_ in range(args.rounds):
            loads.append(os.getloadavg()[0])
            scan_out, plain_out = Path(folder) / f"scan{round_}.jsonl", Path(folder) / f"plain{round_}.jsonl"
            wall, stdout = scan(scan_out)
            walls["memscan scan"].append(wall)
            rates.append(summary_rate(stdout))
            walls["plain diffusers loop"].append(
                timed([sys.executable, __file__, "--plain", str(MODEL), str(prompts), str(plain_out)])[0])
            print(f"round {round_ + 1}: memscan {walls['memscan scan'][-1]:.1f} s, plain {walls['plain diffusers loop'][-1]:.1f} s, "
                  f"load {loads[-1]:.2f}", file=sys.stderr, flush=True)
        long_rate = long_peak = None
        if args.long:
            many = Path(folder) / "long.txt"
            many.write_text("\n".join(sample_prompts(args.long, offset=args.prompts)) + "\n", encoding="utf-8")
            long_peak = matmul_peak(current_threads().threads)  # of the same minute as the long scan
            long_rate = summary_rate(scan(Path(folder) / "long.jsonl", many)[1])
        ours = {r["prompt"]: r["score"] for r in map(json.loads, scan_out.read_text().splitlines())}
        theirs = {r["prompt"]: r["score"] for r in map(json.loads, plain_out.read_text().splitlines())}
    max_rel_diff = max(abs(ours[p] - s) / abs(s) for p, s in theirs.items())
    ratio = statistics.median(p / m for p, m in zip(walls["plain diffusers loop"], walls["memscan scan"]))
    threads = current_threads()
    flops = flops_per_prompt()
    peak = matmul_peak(threads.threads)
    achieved = statistics.median(rates) * flops / 1e9
    record = {
        "prompts": args.prompts, "rounds": args.rounds, "first_scan_seconds": first, "wall_seconds": walls,
        "whole_process_ratio": ratio,
        "max_rel_score_diff": max_rel_diff, "scoring_prompts_per_s": rates, "flops_per_prompt": flops,
        "matmul_peak_gflops": peak, "scoring_gflops": achieved, "roofline_fraction": achieved / peak,
        "load_average": loads, "runtime": threads.record(),
        "long_scan": None if long_rate is None else {
            "prompts": args.long, "prompts_per_s": long_rate, "matmul_peak_gflops": long_peak,
            "roofline_fraction": long_rate * flops / 1e9 / long_peak},
    }
    print(f"{args.prompts} prompts, {args.rounds} rounds, {threads.describe()}, load {', '.join(f'{x:.2f}' for x in loads)}")
    print(f"  first memscan scan     {first:6.1f} s  (compiles the scan plan)")
    for name, seconds in walls.items():
        print(f"  {name:<22} median {statistics.median(seconds):6.1f} s  ({', '.join(f'{s:.1f}' for s in seconds)})")
    print(f"  whole process: memscan {ratio:.2f}x the plain loop (target 3x); scores within {max_rel_diff:.1e} relative")
    print(f"  scoring loop: {statistics.median(rates):.0f} prompts/s x {flops / 1e6:.1f} MFLOP = {achieved:.1f} GFLOP/s; "
          f"fp32 matmul peak {peak:.1f} GFLOP/s: {achieved / peak:.0%} of the roofline (target 50%)")
    if long_rate is not None:
        print(f"  scan of {args.long} prompts: {long_rate:.0f} prompts/s x {flops / 1e6:.1f} MFLOP = "
              f"{long_rate * flops / 1e9:.1f} GFLOP/s; peak {long_peak:.1f} GFLOP/s just before: "
              f"{long_rate * flops / 1e9 / long_peak:.0%} of the roofline (target 50%)")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
