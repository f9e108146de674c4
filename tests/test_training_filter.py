"""MemorizationFilter: magnitudes and keep-mask equal an independent float64 computation; masked loss."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from scanner.detect import DetectSettings, Scanner
from scanner.model import load_model
from scanner.training import MemorizationFilter, TimestepQuantileThreshold, masked_mse_loss

PROMPTS = ["a red cube", "a photo of a dog", "x y z", "two green circles", "an old map of a harbour", "q"]


def _draw_seed() -> int:
    """A fresh seed from the OS's entropy (not from torch's global generator, which fixtures may have seeded)."""
    return int(np.random.default_rng().integers(1 << 31))


def _float64_reference(unet, variant, alphas, latents, timesteps, embeddings, empty) -> tuple[np.ndarray, np.ndarray]:
    """Per sample, on a float64 copy of `unet` and float64 copies of the inputs: the magnitude
    `||eps_c - eps_u||_2` (for v-prediction `sqrt(alpha_bar_t) ||v_c - v_u||`, since
    eps = sqrt(alpha_bar) v + sqrt(1 - alpha_bar) x_t), and `max(||c||, ||u||)` on the same scale."""
    unet64 = copy.deepcopy(unet).double()
    magnitudes, sizes = [], []
    with torch.no_grad():
        for i in range(len(latents)):
            x, t = latents[i : i + 1].double(), timesteps[i : i + 1]
            c = unet64(x, t, encoder_hidden_states=embeddings[i : i + 1].double()).sample
            u = unet64(x, t, encoder_hidden_states=empty.double()).sample
            scale = math.sqrt(alphas[t].double().item()) if variant == "sd2" else 1.0
            magnitudes.append((c - u).norm().item() * scale)
            sizes.append(max(c.norm().item(), u.norm().item()) * scale)
    return np.array(magnitudes), np.array(sizes)


def _setup(variant, tiny_sd1, tiny_sd2, dtype="fp32"):
    model = load_model({"sd1": tiny_sd1, "sd2": tiny_sd2}[variant], device="cpu", dtype=dtype)
    scanner = Scanner(model, DetectSettings())
    return model, scanner, scanner.schedule.scheduler.alphas_cumprod


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
@pytest.mark.parametrize("pass_cond", [False, True])
def test_magnitudes_and_keep_mask_match_float64_reference(variant, pass_cond, tiny_sd1, tiny_sd2):
    model, scanner, alphas = _setup(variant, tiny_sd1, tiny_sd2)
    seed = _draw_seed()
    gen = torch.Generator().manual_seed(seed)
    embeddings = scanner.family.encode(PROMPTS)["encoder_hidden_states"]
    empty = scanner.family.unconditional()["encoder_hidden_states"]
    latents = torch.randn(len(PROMPTS), *model.latent_shape, generator=gen)
    timesteps = torch.randint(0, 1000, (len(PROMPTS),), generator=gen)
    expected, _ = _float64_reference(model.denoiser, variant, alphas, latents, timesteps, embeddings, empty)
    # A scalar threshold halfway between two neighbouring reference magnitudes (drawn at random):
    # both kept and dropped samples occur, and no magnitude lies near the threshold.
    ranked = np.sort(expected)
    k = int(np.random.default_rng(seed).integers(len(ranked) - 1))
    threshold = float((ranked[k] + ranked[k + 1]) / 2)
    filt = MemorizationFilter(model.denoiser, empty, threshold=threshold, prediction_type=scanner.schedule.prediction_type,
                              alphas_cumprod=alphas)

    cond_prediction = model.denoiser(latents, timesteps, encoder_hidden_states=embeddings).sample if pass_cond else None
    result = filt(latents, timesteps, embeddings, cond_prediction)

    assert result.magnitudes.tolist() == pytest.approx(expected.tolist(), rel=1e-4), f"seed {seed}"
    assert not result.magnitudes.requires_grad
    assert result.keep.dtype == torch.bool
    assert result.keep.tolist() == (expected < threshold).tolist(), f"seed {seed}, threshold {threshold}"
    assert 0 < int(result.keep.sum()) < len(PROMPTS)


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_keep_mask_follows_a_fitted_timestep_quantile_rule(variant, tiny_sd1, tiny_sd2):
    model, scanner, alphas = _setup(variant, tiny_sd1, tiny_sd2)
    seed = _draw_seed()
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    bins, quantile = int(rng.integers(2, len(PROMPTS))), float(rng.uniform(0.2, 0.8))
    rule = TimestepQuantileThreshold(quantile, bins)
    embeddings = scanner.family.encode(PROMPTS)["encoder_hidden_states"]
    empty = scanner.family.unconditional()["encoder_hidden_states"]
    latents = torch.randn(len(PROMPTS), *model.latent_shape, generator=gen)
    timesteps = rule.sample_timesteps(len(PROMPTS), gen)  # every bin has a sample
    expected, _ = _float64_reference(model.denoiser, variant, alphas, latents, timesteps, embeddings, empty)

    # The rule, fitted on random magnitudes, with timesteps as the README fits it. Each bin's
    # magnitudes are drawn below the batch's (the bin drops all), above them (keeps all), or
    # across them (keeps some); at least one bin drops and one keeps, so a threshold taken
    # from the wrong bin, or one scalar for all, gets some sample wrong.
    low, high = expected.min(), expected.max()
    kinds = rng.permutation(["drop", "keep", *rng.choice(["drop", "keep", "mixed"], bins - 2)])
    ranges = {"drop": (0.2 * low, 0.9 * low), "keep": (1.1 * high, 3 * high), "mixed": (low, high)}
    fit_timesteps = rule.sample_timesteps(40 * bins, gen)
    fit_bins = rule.bin_of(fit_timesteps).numpy()
    fit_magnitudes = torch.from_numpy(np.array([rng.uniform(*ranges[kinds[b]]) for b in fit_bins])).float()
    rule.fit(fit_magnitudes, fit_timesteps)
    filt = MemorizationFilter(model.denoiser, empty, threshold=rule, prediction_type=scanner.schedule.prediction_type, alphas_cumprod=alphas)
    result = filt(latents, timesteps, embeddings)

    # Independent thresholds: numpy's quantile of the fit magnitudes whose timestep is in the sample's bin.
    edges = [-(-b * 1000 // bins) for b in range(bins + 1)]  # bin b: floor(t * bins / 1000) == b
    fit_t, fit_m = fit_timesteps.numpy(), fit_magnitudes.numpy()
    thresholds = np.array([
        np.quantile(fit_m[(fit_t >= edges[b]) & (fit_t < edges[b + 1])], quantile)
        for b in (np.searchsorted(edges, t, side="right") - 1 for t in timesteps.tolist())
    ])
    # Compare where fp32 rounding cannot decide (a magnitude 1e-4 or more from its threshold: all, but for ~1e-4 odds).
    decided = np.abs(expected - thresholds) > 1e-4 * expected
    message = f"seed {seed}, bins {kinds.tolist()}, quantile {quantile:.3f}, thresholds {thresholds.tolist()}, magnitudes {expected.tolist()}"
    assert decided.sum() >= len(PROMPTS) - 1, message
    assert result.keep.numpy()[decided].tolist() == (expected < thresholds)[decided].tolist(), message


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
@pytest.mark.parametrize("pass_cond", [False, True])
def test_bf16_magnitudes_match_float64_reference(variant, pass_cond, tiny_sd1, tiny_sd2):
    """The README: the filter works in bf16 (the model, its inputs and the step's prediction in bf16)."""
    model, scanner, alphas = _setup(variant, tiny_sd1, tiny_sd2, dtype="bf16")
    assert model.denoiser.dtype == torch.bfloat16
    seed = _draw_seed()
    gen = torch.Generator().manual_seed(seed)
    empty = scanner.family.unconditional()["encoder_hidden_states"]
    # Random embeddings, scaled so the text moves the prediction: with these random weights a
    # caption's embedding changes it by ~2% of its norm, well inside bf16's error, and the test
    # could not tell a right magnitude from a wrong one. At scale 3 the change is ~35%.
    embeddings = (torch.randn(4, *empty.shape[1:], generator=gen) * 3).bfloat16()
    latents = torch.randn(4, *model.latent_shape, generator=gen).bfloat16()
    timesteps = torch.randint(0, 1000, (4,), generator=gen)
    filt = MemorizationFilter(model.denoiser, empty, threshold=0.0, prediction_type=scanner.schedule.prediction_type, alphas_cumprod=alphas)
    cond_prediction = model.denoiser(latents, timesteps, encoder_hidden_states=embeddings).sample if pass_cond else None
    result = filt(latents, timesteps, embeddings, cond_prediction)

    # Reference: the same bf16 weights and inputs, computed in float64.
    expected, sizes = _float64_reference(model.denoiser, variant, alphas, latents, timesteps, embeddings, empty)
    assert result.magnitudes.dtype == torch.float32
    # bf16 keeps 8 significant bits (rounding error 2^-9 = 0.2% of a value); through the UNet
    # each prediction ends up a few such errors off, in proportion to its own norm, and the
    # magnitude inherits them: seen up to 0.9% of max(||c||, ||u||) here. Allowed: 3%, which is
    # under 10% of the magnitudes themselves (each 30-40% of that norm at this embedding scale).
    error = np.abs(result.magnitudes.double().numpy() - expected)
    assert (error <= 0.03 * sizes).all(), f"seed {seed}: errors {(error / sizes).tolist()} of the predictions' norm"
    assert (expected >= 0.15 * sizes).all(), f"seed {seed}: the text barely moves the prediction; the check says little"


def test_masked_mse_loss_averages_the_kept_samples():
    seed = _draw_seed()
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(6, generator=gen) < 0.5
    keep[int(torch.randint(6, (1,), generator=gen))] = True  # at least one kept
    prediction, target = torch.randn(6, 4, 2, 2, generator=gen), torch.randn(6, 4, 2, 2, generator=gen)
    loss = masked_mse_loss(prediction, target, keep)
    p, q = prediction.double().numpy(), target.double().numpy()
    expected = np.mean([((p[i] - q[i]) ** 2).mean() for i in range(6) if keep[i]])
    assert loss.item() == pytest.approx(expected, rel=1e-6), f"seed {seed}, keep {keep.tolist()}"
    assert masked_mse_loss(prediction, target, torch.zeros(6, dtype=torch.bool)) is None
