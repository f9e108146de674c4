"""Eager PyTorch engine: the reference backend and the CPU default."""

from __future__ import annotations

import torch

from .base import UNetEngine


class TorchEngine(UNetEngine):
    """Runs a diffusers `UNet2DConditionModel` eagerly."""

    name = "torch"

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet

    def predict_noise(
        self, latents: torch.Tensor, timestep: torch.Tensor, text_embeddings: torch.Tensor
    ) -> torch.Tensor:
        """The UNet's raw output for latents `[R, C, H, W]`, one timestep, embeddings `[R, L, D]`."""
        return self.unet(latents, timestep, encoder_hidden_states=text_embeddings, return_dict=False)[0]
