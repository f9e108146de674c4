"""Engines run a UNet for a batch: they know nothing of prompts, files or users.

Every engine is a `UNetEngine`: `predict_noise(latents, timestep, text_embeddings)` and
`conditional_norm(latents, timestep, text_embeddings, uncond)`. `create_engine` builds one
by name; a backend that cannot start (no GPU, package missing) raises `EngineUnavailable`
with a one-line reason, and nothing falls back silently. Backends with optional packages
are imported only when asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from .base import EngineUnavailable, UNetEngine
from .torch_engine import TorchEngine


def _torch(unet: torch.nn.Module, cache_dir: str | Path | None = None, cache_key: str | None = None) -> UNetEngine:
    return TorchEngine(unet)


def _compile(unet: torch.nn.Module, cache_dir: str | Path | None = None, cache_key: str | None = None) -> UNetEngine:
    from .compile_engine import CompileEngine

    return CompileEngine(unet)


def _onnx(unet: torch.nn.Module, cache_dir: str | Path | None = None, cache_key: str | None = None) -> UNetEngine:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise EngineUnavailable("onnx engine needs onnxruntime: pip install onnxruntime") from None
    from .onnx_engine import OnnxEngine

    return OnnxEngine(unet, cache_dir, cache_key)


def _tensorrt(unet: torch.nn.Module, cache_dir: str | Path | None = None, cache_key: str | None = None) -> UNetEngine:
    from .tensorrt_engine import TensorRTEngine

    return TensorRTEngine(unet, cache_dir, cache_key)


# name -> factory(unet, cache_dir, cache_key) ; cache_key identifies the model weights.
ENGINES: dict[str, Callable[..., UNetEngine]] = {
    "torch": _torch,
    "compile": _compile,
    "onnx": _onnx,
    "tensorrt": _tensorrt,
}


def create_engine(
    name: str, unet: torch.nn.Module, cache_dir: str | Path | None = None, cache_key: str | None = None
) -> UNetEngine:
    """Build the engine called `name` for `unet`; `EngineUnavailable` if it cannot run here."""
    if name not in ENGINES:
        raise EngineUnavailable(f"unknown engine {name!r} (available: {', '.join(ENGINES)})")
    return ENGINES[name](unet, cache_dir=cache_dir, cache_key=cache_key)


__all__ = ["ENGINES", "EngineUnavailable", "TorchEngine", "UNetEngine", "create_engine"]
