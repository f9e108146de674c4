"""Mitigation during training: drop samples whose text-conditional magnitude is high.

In a fine-tuning step the conditional prediction is already computed (with gradient);
`MemorizationFilter` adds one batched unconditional forward, without gradient, and keeps
the samples with `||eps_c - eps_u||_2 < threshold` (method.md, "Mitigation during training").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .detect import epsilon_scale
from .kernels import guidance_norm


@dataclass
class FilterResult:
    """Per-sample magnitudes `[B]` (fp32, epsilon space) and the keep-mask `[B]` (bool)."""

    magnitudes: torch.Tensor
    keep: torch.Tensor


class MemorizationFilter:
    """Magnitude of the text-conditional noise prediction per training sample, and a keep-mask."""

    def __init__(
        self,
        unet: torch.nn.Module,
        empty_embedding: torch.Tensor,
        threshold: float,
        prediction_type: str = "epsilon",
        alphas_cumprod: torch.Tensor | None = None,
    ):
        if prediction_type != "epsilon" and alphas_cumprod is None:
            raise ValueError(f"prediction_type {prediction_type!r} needs the scheduler's alphas_cumprod")
        self.unet = unet
        self.empty_embedding = empty_embedding  # [1, L, D], the text encoder's output for ""
        self.threshold = threshold
        self.prediction_type = prediction_type
        self.alphas_cumprod = alphas_cumprod

    @torch.no_grad()
    def __call__(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond_embeddings: torch.Tensor,
        cond_prediction: torch.Tensor | None = None,
    ) -> FilterResult:
        """Score a batch; pass the step's own `cond_prediction` to save the conditional forward."""
        batch = len(noisy_latents)
        empty = self.empty_embedding.to(cond_embeddings.dtype).expand(batch, -1, -1)
        if cond_prediction is None:
            latents, text = torch.cat([noisy_latents, noisy_latents]), torch.cat([empty, cond_embeddings])
            uncond, cond = self.unet(latents, timesteps.repeat(2), encoder_hidden_states=text, return_dict=False)[0].chunk(2)
        else:
            cond = cond_prediction.detach()
            uncond = self.unet(noisy_latents, timesteps, encoder_hidden_states=empty, return_dict=False)[0]
        magnitudes = guidance_norm(cond, uncond.to(cond.dtype))
        if self.prediction_type != "epsilon":
            alphas = self.alphas_cumprod.to(timesteps.device)[timesteps].double().cpu().tolist()
            scales = [epsilon_scale(self.prediction_type, a) for a in alphas]
            magnitudes = magnitudes * torch.tensor(scales, dtype=torch.float32, device=magnitudes.device)
        return FilterResult(magnitudes, magnitudes < self.threshold)


def masked_mse_loss(prediction: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor | None:
    """Mean squared error over the kept samples only; None when every sample was dropped."""
    if not bool(keep.any()):
        return None
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return per_sample[keep].mean()
