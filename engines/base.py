"""The engine interface: predict the noise for a batch, optionally return the fused score."""

from __future__ import annotations

import torch

from ..kernels import guidance_norm


class EngineUnavailable(RuntimeError):
    """This backend cannot run here; the message says why in one line."""


class UNetEngine:
    """Base of every backend: `predict_noise` runs the UNet; `conditional_norm` scores.

    Backends override `predict_noise`; those that can fuse the score into the model (an
    ONNX/TensorRT graph with a norm head) also override `conditional_norm`, so that only
    `[R]` floats leave the device instead of whole predictions.
    """

    name = "base"

    def predict_noise(
        self, latents: torch.Tensor, timestep: torch.Tensor, text_embeddings: torch.Tensor
    ) -> torch.Tensor:
        """The UNet's raw output for latents `[R, C, H, W]`, one timestep, embeddings `[R, L, D]`."""
        raise NotImplementedError

    def conditional_norm(
        self, latents: torch.Tensor, timestep: torch.Tensor, text_embeddings: torch.Tensor, uncond: torch.Tensor
    ) -> torch.Tensor:
        """`||predict_noise(latents, t, e) - uncond||_2` per row, fp32 `[R]`; uncond `[R|1, C, H, W]`."""
        return guidance_norm(self.predict_noise(latents, timestep, text_embeddings), uncond)
