"""Eager PyTorch engine: the reference backend and the CPU default."""

from __future__ import annotations

import torch

from .base import Conditioning, DenoiserEngine


class TorchEngine(DenoiserEngine):
    """Runs a denoiser module eagerly."""

    name = "torch"

    def __init__(self, denoiser: torch.nn.Module):
        self.denoiser = denoiser

    def predict(self, latents: torch.Tensor, timestep: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The denoiser's raw output for latents `[R, C, H, W]`, one timestep, conditioning rows `[R, ...]`."""
        return self.denoiser(latents, timestep, **conditioning)
