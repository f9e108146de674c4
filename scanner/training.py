"""Mitigation during training: drop samples whose text-conditional magnitude is high.

In a fine-tuning step the conditional prediction is already computed (with gradient);
`MemorizationFilter` adds one batched unconditional forward, without gradient, and keeps
the samples with `||eps_c - eps_u||_2 < threshold` (method.md, "Mitigation during training").
`TimestepQuantileThreshold` is the threshold rule: a high quantile of normal training pairs'
magnitudes per timestep bin, re-fitted as the model changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .families.base import epsilon_scale
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
        threshold: float | Callable[[torch.Tensor], torch.Tensor],
        prediction_type: str = "epsilon",
        alphas_cumprod: torch.Tensor | None = None,
    ):
        if prediction_type != "epsilon" and alphas_cumprod is None:
            raise ValueError(f"prediction_type {prediction_type!r} needs the scheduler's alphas_cumprod")
        self.unet = unet
        self.empty_embedding = empty_embedding  # [1, L, D], the text encoder's output for ""
        # A float, or a rule mapping timesteps [B] to per-sample thresholds (TimestepQuantileThreshold).
        self.threshold = threshold
        self.prediction_type = prediction_type
        self.alphas_cumprod = alphas_cumprod

    def __call__(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond_embeddings: torch.Tensor,
        cond_prediction: torch.Tensor | None = None,
    ) -> FilterResult:
        """Score a batch and threshold it; pass the step's own `cond_prediction` to save the conditional forward."""
        magnitudes = self.magnitudes(noisy_latents, timesteps, cond_embeddings, cond_prediction)
        threshold = self.threshold(timesteps) if callable(self.threshold) else self.threshold
        return FilterResult(magnitudes, magnitudes < threshold)

    @torch.no_grad()
    def magnitudes(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond_embeddings: torch.Tensor,
        cond_prediction: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-sample `||eps_c - eps_u||_2` `[B]` (fp32, epsilon space), without thresholding (for calibration)."""
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
        return magnitudes


class TimestepQuantileThreshold:
    """Threshold rule: per timestep bin, the `quantile` of normal training pairs' magnitudes.

    Magnitudes depend on the timestep (docs/testbed.md, "Mitigation during training"), so
    one scalar would drop memorized pairs mostly at the timesteps where everything scores
    high; `bins=1` gives that scalar. Fit it on a fixed sample of normal pairs with
    timesteps from `sample_timesteps` (every bin equally filled) and fresh noise, and
    re-fit it as training moves the magnitudes. Call it with timesteps `[B]` to get the
    per-sample thresholds `[B]` (pass it as `MemorizationFilter(threshold=...)`).
    """

    def __init__(self, quantile: float = 0.99, bins: int = 10, num_train_timesteps: int = 1000):
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        if not 1 <= bins <= num_train_timesteps:
            raise ValueError(f"bins must be in [1, {num_train_timesteps}], got {bins}")
        self.quantile = quantile
        self.bins = bins
        self.num_train_timesteps = num_train_timesteps
        self.values: torch.Tensor | None = None  # [bins], fp32, set by fit

    def bin_of(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The bin index of each timestep (equal-width bins over [0, num_train_timesteps))."""
        return torch.div(timesteps.long() * self.bins, self.num_train_timesteps, rounding_mode="floor").clamp(0, self.bins - 1)

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """`n` timesteps, uniform within each bin and spread evenly over the bins (for fitting)."""
        bins = torch.arange(n) % self.bins
        lows, highs = (-(-(bins + edge) * self.num_train_timesteps // self.bins) for edge in (0, 1))  # bin_of's edges
        return lows + (torch.rand(n, generator=generator) * (highs - lows)).long()

    def fit(self, magnitudes: torch.Tensor, timesteps: torch.Tensor) -> TimestepQuantileThreshold:
        """Set each bin's threshold to the quantile of the magnitudes whose timestep falls in it."""
        magnitudes, bins = magnitudes.detach().float().cpu(), self.bin_of(timesteps.cpu())
        counts = torch.bincount(bins, minlength=self.bins)
        if bool((counts == 0).any()):
            raise ValueError(f"every timestep bin needs magnitudes; counts per bin {counts.tolist()}")
        # In float64: torch.quantile takes the quantile's rank q * (n - 1) in its input's dtype, and in float32 a
        # rank off by ~n * 6e-8 lands between two far-apart order statistics in a heavy tail (q near 1): 2e-5 off.
        self.values = torch.stack([torch.quantile(magnitudes[bins == b].double(), self.quantile) for b in range(self.bins)]).float()
        return self

    def __call__(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample thresholds `[B]` for timesteps `[B]`."""
        if self.values is None:
            raise RuntimeError("TimestepQuantileThreshold used before fit")
        return self.values.to(timesteps.device)[self.bin_of(timesteps).to(timesteps.device)]


def masked_mse_loss(prediction: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor | None:
    """Mean squared error over the kept samples only; None when every sample was dropped."""
    if not bool(keep.any()):
        return None
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return per_sample[keep].mean()
