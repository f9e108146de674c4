"""Mitigation at inference: the paper's embedding optimization and the random baselines."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from scanner.cli import main
from scanner.detect import DetectSettings, Scanner
from scanner.generate import seed_latents
from scanner.mitigate import MitigationSettings, baseline, first_step_magnitude, optimize_embedding
from scanner.model import load_model

PROMPT = "The No Limits Business Woman Podcast"


@pytest.fixture(scope="module")
def scanner(tiny_sd2):
    return Scanner(load_model(tiny_sd2, device="cpu"), DetectSettings())


def test_magnitude_equals_float64_reference(scanner):
    latents = seed_latents(scanner.model, [int(s) for s in torch.randint(0, 1000, (3,))])
    embedding = scanner.family.encode([PROMPT])["encoder_hidden_states"].detach()
    got = first_step_magnitude(scanner, {"encoder_hidden_states": embedding}, latents, scanner.unconditional_first_step(latents))
    unet, t0 = scanner.model.denoiser.double(), scanner.timesteps[0]
    try:
        with torch.no_grad():
            c = unet(latents.double(), t0, encoder_hidden_states=embedding.double().expand(3, -1, -1)).sample
            u = unet(latents.double(), t0, encoder_hidden_states=scanner.family.unconditional()["encoder_hidden_states"].double().expand(3, -1, -1)).sample
    finally:
        unet.float()
    alpha = scanner.schedule.scheduler.alphas_cumprod[int(t0)].double()
    expected = (c - u).flatten(1).norm(dim=1).mean() * alpha.sqrt()  # v-prediction -> epsilon
    assert float(got) == pytest.approx(float(expected), rel=1e-4)


def _random_seeds(count: int) -> list[int]:
    """`count` fresh latent seeds for this run; the tests show them in their messages."""
    return [random.randrange(2**31) for _ in range(count)]


def test_optimization_lowers_magnitude_and_keeps_bos(scanner):
    seeds = _random_seeds(2)
    latents = seed_latents(scanner.model, seeds)
    result = optimize_embedding(scanner, PROMPT, latents, MitigationSettings(target=0.0))
    assert result.iterations == 10, f"seeds {seeds}"  # an unreachable target runs every iteration
    assert result.score_after < result.score_before, f"seeds {seeds}"
    encoded = scanner.family.encode([PROMPT])["encoder_hidden_states"]
    assert torch.equal(result.conditioning["encoder_hidden_states"][:, 0], encoded[:, 0])
    assert not torch.allclose(result.conditioning["encoder_hidden_states"][:, 1:], encoded[:, 1:])


def test_early_stop_and_untouched_prompts(scanner):
    seeds = _random_seeds(1)
    latents = seed_latents(scanner.model, seeds)
    untouched = optimize_embedding(scanner, PROMPT, latents, MitigationSettings(target=1e9))
    assert untouched.iterations == 0 and untouched.score_after == untouched.score_before, f"seeds {seeds}"
    assert torch.equal(untouched.conditioning["encoder_hidden_states"], scanner.family.encode([PROMPT])["encoder_hidden_states"])
    full = optimize_embedding(scanner, PROMPT, latents, MitigationSettings(target=0.0))
    # A target between the start and the 10-iteration result stops early, once under it.
    target = (full.score_before + full.score_after) / 2
    stopped = optimize_embedding(scanner, PROMPT, latents, MitigationSettings(target=target))
    assert 1 <= stopped.iterations < 10 and stopped.score_after <= target, f"seeds {seeds}"
    # A trigger above the score leaves the prompt alone whatever the target; one below lets it run to the target.
    spared = optimize_embedding(scanner, PROMPT, latents, MitigationSettings(target=0.0, trigger=full.score_before * 1.01))
    assert spared.iterations == 0, f"seeds {seeds}"
    driven = optimize_embedding(scanner, PROMPT, latents, MitigationSettings(target=target, trigger=full.score_before * 0.99))
    assert driven.iterations == stopped.iterations, f"seeds {seeds}"
    assert driven.score_after == pytest.approx(stopped.score_after), f"seeds {seeds}"


@pytest.mark.parametrize("method", ["rand-token", "rand-number", "embed-noise"])
def test_baselines(scanner, method):
    latent_seeds = _random_seeds(1)
    latents = seed_latents(scanner.model, latent_seeds)
    seed = random.randrange(10**6)
    context = f"baseline seed {seed}, latent seeds {latent_seeds}"
    result = baseline(scanner, PROMPT, method, latents, seed=seed)
    again = baseline(scanner, PROMPT, method, latents, seed=seed)
    assert result.prompt == again.prompt and torch.equal(result.conditioning["encoder_hidden_states"], again.conditioning["encoder_hidden_states"]), context  # deterministic per seed
    encoded = scanner.family.encode([PROMPT])["encoder_hidden_states"]
    if method == "embed-noise":
        assert result.prompt == PROMPT
        assert torch.equal(result.conditioning["encoder_hidden_states"][:, 0], encoded[:, 0])
        assert 0.05 < float((result.conditioning["encoder_hidden_states"] - encoded)[:, 1:].std()) < 0.2, context
    else:
        added = len(result.prompt.split()) - len(PROMPT.split())
        assert added >= 4 and all(word in result.prompt for word in PROMPT.split()), context
        if method == "rand-number":
            assert sum(word.isdigit() for word in result.prompt.split()) == 4, context
    assert result.score_before == pytest.approx(
        float(first_step_magnitude(scanner, {"encoder_hidden_states": encoded}, latents, scanner.unconditional_first_step(latents))), rel=1e-6
    ), context


def test_mitigate_command(tmp_path, tiny_sd1, capsys, monkeypatch):
    monkeypatch.setattr("scanner.cli.progress.DISABLE", False)  # the bars as on a terminal
    out = tmp_path / "m"
    seeds = ",".join(map(str, _random_seeds(2)))
    code = main(["mitigate", PROMPT, "--model", str(tiny_sd1), "--out", str(out), "--target", "0", "--seeds", seeds, "--inference-steps", "4", "--format", "json"])
    assert code == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert "generating before/after" in captured.err and "4/4" in captured.err  # the 4 DDIM steps, before and after
    assert set(report) >= {"prompt", "method", "score_before", "score_after", "target", "iterations", "seconds", "images"}
    assert report["iterations"] == 10 and report["score_after"] < report["score_before"], f"seeds {seeds}"
    from PIL import Image

    from scanner.generate import DISPLAY_SIDE, GUTTER, HEADER_HEIGHT, LABEL_WIDTH, upscale

    shown, raw = (np.asarray(Image.open(out / name)) for name in report["images"])
    assert raw.shape == (2 * 16 + 2, 2 * 16 + 2, 3)  # 2 seeds x (before, after) of 16 x 16 images, unscaled
    # Enlarged 16x (nearest neighbour) beside the labels: the last tile is the after image of the second seed.
    assert shown.shape == (HEADER_HEIGHT + 2 * DISPLAY_SIDE + GUTTER, LABEL_WIDTH + 2 * DISPLAY_SIDE + GUTTER, 3)
    last = shown[-DISPLAY_SIDE:, -DISPLAY_SIDE:]
    assert np.array_equal(last, upscale(raw[18:, 18:]))
    assert main(["mitigate", PROMPT, "--model", str(tiny_sd1), "--out", str(out)]) == 2
    assert "needs a target" in capsys.readouterr().err


def test_mitigate_takes_its_target_from_a_calibration(tmp_path, tiny_sd1, capsys):
    from scanner.calibration import load_calibration
    from scanner.testbed import default_model_path

    shipped = default_model_path() / "calibration.json"
    args = [PROMPT, "--out", str(tmp_path), "--seeds", "0", "--format", "json"]  # the calibration is for 50 steps
    # The bundled testbed's own calibration is the default there.
    assert main(["mitigate", *args]) == 0
    report, calibration = json.loads(capsys.readouterr().out), load_calibration(shipped)
    assert (report["trigger"], report["target"]) == (calibration.threshold, calibration.normal_median)
    assert report["learning_rate"] == json.loads((default_model_path() / "mitigation.json").read_text())["learning_rate"]
    # A calibration made for another model is refused.
    assert main(["mitigate", *args, "--model", str(tiny_sd1), "--calibration", str(shipped)]) == 2
    assert "calibration is for model" in capsys.readouterr().err


def test_model_budget_reads_a_model_folders_mitigation_json(tmp_path):
    from scanner.errors import MemscanError
    from scanner.mitigate import BUDGET_FILE, model_budget

    assert model_budget(tmp_path) == {} and model_budget("org/not-a-folder") == {}
    lr = float(torch.rand(()) + 0.01)
    (tmp_path / BUDGET_FILE).write_text(json.dumps({"learning_rate": lr, "max_iterations": 3, "why": "measured"}))
    assert model_budget(tmp_path) == {"learning_rate": lr, "max_iterations": 3}
    for bad in ({"learning_rate": 0}, {"learning_rate": "0.1"}, {"max_iterations": 2.5}, {"max_iterations": True}):
        (tmp_path / BUDGET_FILE).write_text(json.dumps(bad))
        with pytest.raises(MemscanError, match=BUDGET_FILE):
            model_budget(tmp_path)
    (tmp_path / BUDGET_FILE).write_text("{")
    with pytest.raises(MemscanError, match="not a readable JSON"):
        model_budget(tmp_path)


def test_mitigate_command_takes_its_budget_from_the_model_folder(tmp_path, tiny_sd1, capsys):
    import shutil

    from scanner.generate import build_pipeline
    from scanner.mitigate import BUDGET_FILE, mitigate_and_generate

    folder = shutil.copytree(tiny_sd1, tmp_path / "model")
    lr = float(torch.empty(()).uniform_(0.02, 0.2))
    (folder / BUDGET_FILE).write_text(json.dumps({"learning_rate": lr, "max_iterations": 3}))
    seeds = _random_seeds(1)
    steps = 5  # a short trajectory: the budget is what is checked
    args = [PROMPT, "--model", str(folder), "--out", str(tmp_path / "m"), "--target", "0", "--seeds", str(seeds[0]),
            "--inference-steps", str(steps), "--format", "json"]
    assert main(["mitigate", *args]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["learning_rate"], report["max_iterations"], report["iterations"]) == (lr, 3, 3)
    scanner = Scanner(load_model(folder, device="cpu"), DetectSettings(num_inference_steps=steps))
    expected = mitigate_and_generate(scanner, build_pipeline(scanner.model), PROMPT, "embed", seeds, MitigationSettings(0, lr, 3),
                                     steps)
    assert report["score_after"] == pytest.approx(expected.result.score_after, rel=1e-5), f"seeds {seeds}"
    # The options override the folder's budget.
    assert main(["mitigate", *args, "--lr", "0.05", "--iterations", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["learning_rate"], report["iterations"]) == (0.05, 1)
