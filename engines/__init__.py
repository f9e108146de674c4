"""Engines run a UNet for a batch: they know nothing of prompts, files or users.

Every engine has `name` and `predict_noise(latents, timestep, text_embeddings)`.
"""

from .torch_engine import TorchEngine

__all__ = ["TorchEngine"]
