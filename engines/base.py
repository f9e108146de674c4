"""The engine interface: run a denoiser for a batch, optionally return the fused score."""

from __future__ import annotations

import torch

from ..kernels import guidance_norm

# The denoiser's text conditioning: its keyword arguments, every tensor batched on dim 0.
Conditioning = dict[str, torch.Tensor]


class EngineUnavailable(RuntimeError):
    """This backend cannot run here; the message says why in one line."""


class DenoiserEngine:
    """Base of every backend: `predict` runs the denoiser; `conditional_norm` scores.

    A denoiser is a module `forward(sample [R, C, H, W], timestep [], **conditioning) -> [R, C, H, W]`
    (a model family's `denoiser_module()`), so engines know nothing of families. Backends
    override `predict`; those that can fuse the score into the model (an ONNX/TensorRT graph
    with a norm head) also override `conditional_norm`, so that only `[R]` floats leave the
    device instead of whole predictions.
    """

    name = "base"

    def predict(self, latents: torch.Tensor, timestep: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The denoiser's raw output for latents `[R, C, H, W]`, one timestep, conditioning rows `[R, ...]`."""
        raise NotImplementedError

    def conditional_norm(
        self, latents: torch.Tensor, timestep: torch.Tensor, conditioning: Conditioning, uncond: torch.Tensor
    ) -> torch.Tensor:
        """`||predict(latents, t, c) - uncond||_2` per row, fp32 `[R]`; uncond `[R|1, C, H, W]`."""
        return guidance_norm(self.predict(latents, timestep, conditioning), uncond)
