"""`memscan generate`: images equal diffusers' StableDiffusionPipeline for the same seeds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from scanner.cli import main
from scanner.detect import DetectSettings, Scanner
from scanner.generate import DISPLAY_SIDE, GUTTER, HEADER_HEIGHT, LABEL_WIDTH, upscale
from scanner.model import load_model


def test_generate_matches_diffusers_pipeline(tmp_path, tiny_sd1, capsys, monkeypatch):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    seeds = [int(s) for s in torch.randint(0, 10_000, (3,))]
    prompt = "a photo of an astronaut riding a horse"
    out = tmp_path / "gen"
    monkeypatch.setattr("scanner.cli.progress.DISABLE", False)  # the bar as on a terminal
    code = main(["generate", prompt, "--model", str(tiny_sd1), "--out", str(out), "--seeds", ",".join(map(str, seeds)), "--inference-steps", "10"])
    assert code == 0
    err = capsys.readouterr().err
    assert "generating" in err and "10/10" in err  # a bar over the 10 DDIM steps

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        [prompt] * len(seeds),
        num_inference_steps=10,
        guidance_scale=7.5,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="np",
    ).images
    expected = (expected * 255).round().astype(np.uint8)
    for seed, image in zip(seeds, expected):
        got = np.asarray(Image.open(out / f"seed-{seed}.png"))
        assert np.abs(got.astype(int) - image.astype(int)).max() <= 1

    sidecar = json.loads((out / "generation.json").read_text())
    assert sidecar["seeds"] == seeds and sidecar["prompt"] == prompt
    assert sidecar["images"] == [f"seed-{s}.png" for s in seeds]
    # The preview: every seed's raw pixels enlarged 16x (nearest neighbour) in a row, under its seed's label.
    preview = np.asarray(Image.open(out / sidecar["preview"]))
    assert preview.shape == (HEADER_HEIGHT + DISPLAY_SIDE, LABEL_WIDTH + 3 * DISPLAY_SIDE + 2 * GUTTER, 3)
    for c, seed in enumerate(seeds):
        left = LABEL_WIDTH + c * (DISPLAY_SIDE + GUTTER)
        tile = preview[HEADER_HEIGHT:, left : left + DISPLAY_SIDE]
        assert np.array_equal(tile, upscale(np.asarray(Image.open(out / f"seed-{seed}.png"))))
    scanner = Scanner(load_model(tiny_sd1, device="cpu"), DetectSettings())
    assert sidecar["score"] == pytest.approx(scanner.score([prompt]).score[0].item(), rel=1e-6)
    assert sidecar["model"] == scanner.model.fingerprint


def test_generate_rejects_bad_seeds(tmp_path, tiny_sd1, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "a cat", "--model", str(tiny_sd1), "--out", str(tmp_path), "--seeds", "1,x"])
    assert exit_info.value.code == 2 and "comma-separated integers" in capsys.readouterr().err
