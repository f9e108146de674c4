"""The engine interface: run a denoiser for a batch, optionally return the fused score; run text encoders."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from ..kernels import guidance_norm

# The denoiser's text conditioning: its keyword arguments, every tensor batched on dim 0.
Conditioning = dict[str, torch.Tensor]
# A text encoder as an engine runs it: keyword tensors `[B, ...]` in (`input_ids`, ...), a tuple of
# tensors out, in the order of the module's `output_names` (a family's `TextEncoderModule`).
TextEncoder = Callable[..., tuple[torch.Tensor, ...]]


class EngineUnavailable(RuntimeError):
    """This backend cannot run here; the message says why in one line."""


class DenoiserEngine:
    """Base of every backend: `predict` runs the denoiser; `conditional_norm` scores.

    A denoiser is a module `forward(sample [R, C, H, W], timestep [], **conditioning) -> [R, C, H, W]`
    (a model family's `denoiser_module()`), so engines know nothing of families. Backends
    override `predict`; those that can fuse the score into the model (an ONNX/TensorRT graph
    with a norm head) also override `conditional_norm`, so that only `[R]` floats leave the
    device instead of whole predictions. `text_encoder` runs the model's text encoders the same
    way (eagerly unless a backend overrides `_text_encoder`), so that an engine covers the whole
    per-prompt cost.
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

    def text_encoder(self, name: str, module: torch.nn.Module) -> TextEncoder:
        """How this engine runs the model's text encoder `name` (`module`: `forward(**inputs) -> tuple`), made once per name."""
        if name not in self._text_encoders:
            self._text_encoders[name] = self._text_encoder(name, module)
        return self._text_encoders[name]

    def _text_encoder(self, name: str, module: torch.nn.Module) -> TextEncoder:
        """Backends override: the runner of a text encoder module. Here: the module itself, eager."""
        return module

    @functools.cached_property
    def _text_encoders(self) -> dict[str, TextEncoder]:
        # Made once per engine, not per Scanner: sessions and compiled graphs are reused.
        return {}
