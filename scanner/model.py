"""Load a text-to-image checkpoint (diffusers layout) for scanning.

A checkpoint is a pipeline folder as diffusers' `save_pretrained` writes it (its family,
`scanner.families`, is picked from `model_index.json`), or a hub id already in the local
Hugging Face cache. Nothing is downloaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import fingerprint, resolve_model_path
from .errors import MemscanError

if TYPE_CHECKING:
    import torch

    from .families import Family

# The --dtype names and torch's; torch is imported where a model is loaded, not here (`scanner.plan` needs none).
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass
class ScanModel:
    """A loaded model: its family adapter (encoders, denoiser, sampler) plus the fingerprint."""

    family: Family
    fingerprint: str
    source: str
    device: torch.device
    dtype: torch.dtype

    @property
    def denoiser(self) -> torch.nn.Module:
        """The diffusers denoiser (a UNet or a transformer)."""
        return self.family.denoiser

    @property
    def tokenizer(self) -> Any:
        """The transformers tokenizer of the primary text encoder (words, token counts)."""
        return self.family.tokenizer.tokenizer

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one latent at the pipeline's default resolution."""
        return self.family.latent_shape


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; a named device must exist."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise MemscanError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MemscanError(f"device {device!r} asked for, but torch sees no CUDA device")
    return dev


# On the CPU a batch holds about this many latent elements (rows x C x H x W), so that a small model's
# calls are not all per-operator overhead: 16 rows of SD 1.x's 4 x 64 x 64, 256 of the testbed's 4 x 8 x 8
# (its scoring rate at batch 256 against 16: bench/batch_size.py, bench/RESULTS.md).
CPU_BATCH_ELEMENTS = 2**18
CPU_BATCH_RANGE = (16, 256)


def default_batch_size(device: torch.device | str, latent_shape: tuple[int, ...] | None = None) -> int:
    """Prompts per denoiser batch: 64 on CUDA, where small batches leave the GPU idle; on the CPU 16, or up to
    256 for small latents (`CPU_BATCH_ELEMENTS`)."""
    if str(device).startswith("cuda"):
        return 64
    low, high = CPU_BATCH_RANGE
    if latent_shape is None:
        return low
    return max(low, min(high, CPU_BATCH_ELEMENTS // math.prod(latent_shape)))


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` -> fp16 on GPU, fp32 on CPU; fp16 is refused on the CPU (slow, partly unsupported)."""
    import torch

    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise MemscanError(f"unknown dtype {dtype!r} (use auto, {', '.join(DTYPES)})")
    if dtype == "fp16" and device.type == "cpu":
        raise MemscanError("fp16 is not supported on the CPU; use fp32 or bf16")
    return getattr(torch, DTYPES[dtype])


def identify_model(path: Path) -> tuple[type[Family], str]:
    """The family of the pipeline folder `path` (after its checks) and its fingerprint, without loading it."""
    from .families import family_for

    family, _ = family_for(path)
    return family, fingerprint(path, family.components)


def load_model(name_or_path: str | Path, device: str = "auto", dtype: str = "auto") -> ScanModel:
    """Load a text-to-image pipeline folder's text encoders and denoiser through its family adapter."""
    from .families import family_for

    path = resolve_model_path(name_or_path)
    family, index = family_for(path)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    loaded = family.load(path, index, dev, torch_dtype)
    return ScanModel(
        family=loaded,
        fingerprint=fingerprint(path, family.components),
        source=str(path),
        device=dev,
        dtype=torch_dtype,
    )
