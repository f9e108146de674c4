"""Training-time overhead of the memorization filter: the testbed loop with and without it, side by side.

Both variants run in one process, alternated (unfiltered, filtered, unfiltered, ...), on the
testbed's data and recipe, so that a shared machine's load falls on both alike; process CPU
time is reported besides wall time, as it is far less sensitive to that load. The latents
come from an untrained autoencoder: the time of a step does not depend on their values.

    python bench/finetune_overhead.py --steps 200 --repeats 2 --json overhead.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, replace

import numpy as np
import torch
from diffusers import AutoencoderKL
from transformers import CLIPTokenizer

from scanner.clip_vocab import write_clip_tokenizer
from scanner.testbed.build import BuildConfig, encode_images, make_data, train_denoiser, vae_config
from scanner.testbed.filtering import FilterSettings


def main() -> None:
    """Time `--steps` training steps with and without the filter, `--repeats` times each, alternated."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps per run (default: 200)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant (default: 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--tokenizer-dir", default="/tmp/memscan-overhead-tokenizer", help="where to write the CLIP tokenizer")
    parser.add_argument("--json", help="write the timings here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    cfg = replace(BuildConfig(), train_steps=args.steps, monitor_every=0, threads=args.threads)
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(args.tokenizer_dir))
    data = make_data(cfg, np.random.default_rng(0), tokenizer)
    torch.manual_seed(0)
    latents = encode_images(AutoencoderKL(**vae_config(cfg)), torch.from_numpy(data.images))
    latents = latents / latents.std()
    seconds = {clock: {"unfiltered": [], "filtered": []} for clock in ("wall", "cpu")}
    for _ in range(args.repeats):
        for name, filtering in (("unfiltered", None), ("filtered", FilterSettings())):
            torch.manual_seed(0)
            wall, cpu = time.perf_counter(), time.process_time()
            train_denoiser(cfg, data, latents, [tokenizer], torch.Generator().manual_seed(0), lambda _: None, filtering)
            seconds["wall"][name].append(round(time.perf_counter() - wall, 2))
            seconds["cpu"][name].append(round(time.process_time() - cpu, 2))
            print(f"{name}: {seconds['wall'][name][-1]:.1f} s wall, {seconds['cpu'][name][-1]:.1f} s CPU "
                  f"for {args.steps} steps", flush=True)
    result = {"steps": args.steps, "threads": args.threads, "filter": asdict(FilterSettings()), "seconds": seconds}
    for clock, runs in seconds.items():
        base, filtered = statistics.median(runs["unfiltered"]), statistics.median(runs["filtered"])
        result[f"overhead_{clock}"] = round(filtered / base - 1, 4)
        print(f"filter overhead, {clock} time: {filtered / base - 1:+.1%} (median {filtered:.1f} s against {base:.1f} s)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
