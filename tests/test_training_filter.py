"""MemorizationFilter: magnitudes equal an independent float64 computation; mask and loss."""

from __future__ import annotations

import math

import pytest
import torch

from scanner.detect import DetectSettings, Scanner
from scanner.model import load_model
from scanner.training import MemorizationFilter, masked_mse_loss


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
@pytest.mark.parametrize("pass_cond", [False, True])
def test_magnitudes_match_float64_reference(variant, pass_cond, tiny_sd1, tiny_sd2):
    model = load_model({"sd1": tiny_sd1, "sd2": tiny_sd2}[variant], device="cpu")
    scanner = Scanner(model, DetectSettings())
    unet = model.unet
    embeddings = scanner.encoder.encode(["a red cube", "a photo of a dog", "x y z"]).embeddings
    empty = scanner.encoder.empty_embedding()
    latents = torch.randn(3, *model.latent_shape)
    timesteps = torch.randint(0, 1000, (3,))
    alphas = scanner.scheduler.alphas_cumprod
    filt = MemorizationFilter(unet, empty, threshold=0.0, prediction_type=model.prediction_type, alphas_cumprod=alphas)

    cond_prediction = unet(latents, timesteps, encoder_hidden_states=embeddings).sample if pass_cond else None
    result = filt(latents, timesteps, embeddings, cond_prediction)

    unet64 = unet.double()
    try:
        expected = []
        for i in range(3):
            x, t = latents[i : i + 1].double(), timesteps[i : i + 1]
            c = unet64(x, t, encoder_hidden_states=embeddings[i : i + 1].double()).sample
            u = unet64(x, t, encoder_hidden_states=empty.double()).sample
            scale = math.sqrt(alphas[t].item()) if variant == "sd2" else 1.0
            expected.append((c - u).norm().item() * scale)
    finally:
        unet.float()
    assert result.magnitudes.tolist() == pytest.approx(expected, rel=1e-4)
    assert not result.magnitudes.requires_grad


def test_keep_mask_and_masked_loss():
    magnitudes = torch.rand(6) * 4
    threshold = float(magnitudes.median())
    keep = magnitudes < threshold
    prediction, target = torch.randn(6, 4, 2, 2), torch.randn(6, 4, 2, 2)
    loss = masked_mse_loss(prediction, target, keep)
    expected = ((prediction - target) ** 2).flatten(1).mean(1)[keep].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert masked_mse_loss(prediction, target, torch.zeros(6, dtype=torch.bool)) is None
