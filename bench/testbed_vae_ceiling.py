"""How far a built testbed's autoencoder lets a generation reproduce a planted image.

    python bench/testbed_vae_ceiling.py FOLDER [FOLDER ...]

For each build: every planted training image through the saved VAE and back (the posterior
mean, no denoiser), and the NCC of the round trip with the image, the ground truth's measure
(`scanner.testbed.similarity`). A generation cannot come closer to its image than the decoder
lets it, so the share of round trips at NCC >= 0.8 bounds the share of planted prompts that
can reproduce their image. Printed beside the build's VAE training steps and its measured
reproduction.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from scanner.testbed.build import load_build_data
from scanner.testbed.groundtruth import REPRODUCTION_THRESHOLD
from scanner.testbed.similarity import normalized_cross_correlation


@torch.no_grad()
def round_trip_ncc(folder: Path) -> np.ndarray:
    """NCC of each planted image with its VAE round trip, `[num_planted]`."""
    data = load_build_data(folder)
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    planted = [data.captions.index(row["prompt"]) for row in data.eval_prompts if row["kind"] == "planted"]
    images = torch.from_numpy(data.images[planted]).float()
    decoded = vae.decode(vae.encode(images).latent_dist.mean).sample.clamp(-1, 1)
    return np.diag(normalized_cross_correlation(decoded.numpy(), data.images[planted]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="testbed builds (memscan testbed build)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| build | VAE steps | round trip NCC, mean | 10th percentile | round trips >= 0.8 | planted reproduced (build) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for folder in args.folders:
        stats = json.loads((folder / "testbed_stats.json").read_text(encoding="utf-8"))
        ncc = round_trip_ncc(folder)
        print(f"| {folder} | {stats['config']['vae_steps']} | {ncc.mean():.3f} | {np.percentile(ncc, 10):.3f} | "
              f"{(ncc >= REPRODUCTION_THRESHOLD).mean():.0%} | {stats['groundtruth']['planted_reproduced']:.0%} |")


if __name__ == "__main__":
    main()
