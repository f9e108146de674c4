"""How the training-time magnitude depends on the timestep, for normal and planted training pairs of a testbed build.

For `--pairs` normal and as many planted training pairs at random timesteps and noise (as
the training loop draws them), per timestep bin: the normal pairs' median and 0.99 quantile,
the planted pairs' median, and the share of planted pairs that a per-bin threshold (the
normal 0.99 quantile of that bin) and one scalar threshold (the normal 0.99 quantile over
all timesteps) would drop. This is the measurement behind `TimestepQuantileThreshold`'s bins.

    python bench/magnitude_by_timestep.py /tmp/tb-new --json magnitudes.json
"""

from __future__ import annotations

import argparse
import json

import torch

from scanner.testbed.build import load_build_data
from scanner.testbed.groundtruth import load_pipeline
from scanner.testbed.recipes import tokenize, training_scheduler
from scanner.training import MemorizationFilter, TimestepQuantileThreshold

QUANTILE = 0.99


@torch.no_grad()
def main() -> None:
    """Print (and optionally write) the per-bin table for one build."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build", help="a `memscan testbed build` folder")
    parser.add_argument("--pairs", type=int, default=2000, help="normal pairs, and as many planted ones (default: 2000)")
    parser.add_argument("--bins", type=int, default=10, help="timestep bins (default: 10)")
    parser.add_argument("--json", help="write the table here")
    args = parser.parse_args()

    torch.set_num_threads(1)
    data, pipe = load_build_data(args.build), load_pipeline(args.build)
    generator = torch.Generator().manual_seed(0)
    num_normal = int((data.repeats == 1).sum())
    normal = torch.randint(0, num_normal, (args.pairs,), generator=generator)
    planted = torch.randint(num_normal, len(data.repeats), (args.pairs,), generator=generator)
    index = torch.cat([normal, planted])
    latents = pipe.vae.encode(torch.from_numpy(data.images[index.numpy()])).latent_dist.mean * pipe.vae.config.scaling_factor
    scheduler = training_scheduler()
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), generator=generator)
    noisy = scheduler.add_noise(latents, torch.randn(latents.shape, generator=generator), timesteps)
    ids = tokenize(pipe.tokenizer, [data.captions[i] for i in index.tolist()])
    magnitude_filter = MemorizationFilter(pipe.unet, pipe.text_encoder(tokenize(pipe.tokenizer, [""]))[0], threshold=0.0)
    magnitudes = torch.cat([
        magnitude_filter.magnitudes(x, t, pipe.text_encoder(i)[0])
        for x, t, i in zip(noisy.split(256), timesteps.split(256), ids.split(256))
    ])
    is_normal = torch.arange(len(index)) < args.pairs
    per_bin = TimestepQuantileThreshold(QUANTILE, args.bins).fit(magnitudes[is_normal], timesteps[is_normal])
    scalar = TimestepQuantileThreshold(QUANTILE, 1).fit(magnitudes[is_normal], timesteps[is_normal])
    bins = per_bin.bin_of(timesteps)
    rows = []
    for b in range(args.bins):
        n, p = is_normal & (bins == b), ~is_normal & (bins == b)
        rows.append({
            "bin": b, "normal_median": float(magnitudes[n].median()), "normal_q99": float(per_bin.values[b]),
            "planted_median": float(magnitudes[p].median()),
            "planted_dropped_per_bin": float((magnitudes[p] >= per_bin(timesteps[p])).float().mean()),
            "planted_dropped_scalar": float((magnitudes[p] >= scalar.values[0]).float().mean()),
        })
        print(" ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[-1].items()))
    planted = ~is_normal
    summary = {
        "scalar_threshold": float(scalar.values[0]),
        "planted_dropped_per_bin": float((magnitudes[planted] >= per_bin(timesteps[planted])).float().mean()),
        "planted_dropped_scalar": float((magnitudes[planted] >= scalar.values[0]).float().mean()),
    }
    print(summary)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"build": args.build, "pairs": args.pairs, "bins": rows, **summary}, f, indent=2)


if __name__ == "__main__":
    main()
