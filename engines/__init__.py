"""Engines run a denoiser and text encoders for a batch: they know nothing of prompts, files, users or model families.

Every engine is a `DenoiserEngine`: `predict(latents, timestep, conditioning)` and
`conditional_norm(latents, timestep, conditioning, uncond)`, where `conditioning` is the
denoiser's keyword tensors, and `text_encoder(name, module)`, the runner of a text encoder
module (see `base`). `create_engine` builds one
by name; a backend that cannot start (no GPU, package missing) raises `EngineUnavailable`
with a one-line reason, and nothing falls back silently. Backends with optional packages
are imported only when asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from .base import Conditioning, DenoiserEngine, EngineUnavailable, TextEncoder
from .torch_engine import TorchEngine


def _torch(denoiser: torch.nn.Module, cache_dir: str | Path | None = None, cache_key: str | None = None) -> DenoiserEngine:
    return TorchEngine(denoiser)


def _compile(denoiser: torch.nn.Module, cache_dir: str | Path | None = None, cache_key: str | None = None) -> DenoiserEngine:
    from .compile_engine import CompileEngine

    return CompileEngine(denoiser)


def _onnx(denoiser: torch.nn.Module, cache_dir: str | Path | None = None, cache_key: str | None = None) -> DenoiserEngine:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise EngineUnavailable("onnx engine needs onnxruntime: pip install onnxruntime") from None
    from .onnx_engine import OnnxEngine

    return OnnxEngine(denoiser, cache_dir, cache_key)


def _tensorrt(denoiser: torch.nn.Module, cache_dir: str | Path | None = None, cache_key: str | None = None) -> DenoiserEngine:
    from .tensorrt_engine import TensorRTEngine

    return TensorRTEngine(denoiser, cache_dir, cache_key)


# name -> factory(denoiser, cache_dir, cache_key) ; cache_key identifies the model weights.
ENGINES: dict[str, Callable[..., DenoiserEngine]] = {
    "torch": _torch,
    "compile": _compile,
    "onnx": _onnx,
    "tensorrt": _tensorrt,
}


def create_engine(
    name: str, denoiser: torch.nn.Module, cache_dir: str | Path | None = None, cache_key: str | None = None
) -> DenoiserEngine:
    """Build the engine called `name` for `denoiser`; `EngineUnavailable` if it cannot run here."""
    if name not in ENGINES:
        raise EngineUnavailable(f"unknown engine {name!r} (available: {', '.join(ENGINES)})")
    return ENGINES[name](denoiser, cache_dir=cache_dir, cache_key=cache_key)


__all__ = ["ENGINES", "Conditioning", "DenoiserEngine", "EngineUnavailable", "TextEncoder", "TorchEngine", "create_engine"]
