"""Load a text-to-image checkpoint (diffusers layout) for scanning.

A checkpoint is a pipeline folder as diffusers' `save_pretrained` writes it (its family,
`scanner.families`, is picked from `model_index.json`), or a hub id already in the local
Hugging Face cache. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .cache import cache_dir
from .errors import MemscanError
from .families import Family, family_for
from .families.base import read_json

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
    if torch.device(device).type == "cuda":
        return 64
    low, high = CPU_BATCH_RANGE
    if latent_shape is None:
        return low
    return max(low, min(high, CPU_BATCH_ELEMENTS // math.prod(latent_shape)))


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` -> fp16 on GPU, fp32 on CPU; fp16 is refused on the CPU (slow, partly unsupported)."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise MemscanError(f"unknown dtype {dtype!r} (use auto, {', '.join(DTYPES)})")
    if dtype == "fp16" and device.type == "cpu":
        raise MemscanError("fp16 is not supported on the CPU; use fp32 or bf16")
    return DTYPES[dtype]


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A local folder as is; otherwise a hub id looked up in the local Hugging Face cache only."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise MemscanError(f"model {str(name_or_path)!r} is a file; expected a diffusers pipeline folder")
    name = str(name_or_path)
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        from huggingface_hub import constants, snapshot_download

        try:
            return Path(snapshot_download(name, local_files_only=True))
        except Exception as exc:  # huggingface_hub raises several types for "not cached"
            raise MemscanError(
                f"model {name!r} is not a folder and is not in the local Hugging Face cache "
                f"({constants.HF_HUB_CACHE}); download it where there is network access, "
                f"or pass a local folder"
            ) from exc
    raise MemscanError(f"model folder {name!r} does not exist")


FINGERPRINT_CACHE = "fingerprints.json"  # in cache_dir(): {stat key: fingerprint}
FINGERPRINT_CACHE_ENTRIES = 256


def _component_files(path: Path, components: tuple[str, ...]) -> list[Path]:
    return [
        file
        for component in components
        if (path / component).is_dir()
        for file in sorted(p for p in (path / component).rglob("*") if p.is_file())
    ]


def hash_files(path: Path, files: list[Path]) -> str:
    """SHA-256 of the files' paths and contents (JSON canonicalised), as a short fingerprint."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        if file.suffix == ".json":
            # Key order and whitespace must not change the fingerprint.
            digest.update(json.dumps(read_json(file), sort_keys=True).encode())
        else:
            with file.open("rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
    return "sha256:" + digest.hexdigest()[:16]


def fingerprint(path: Path, components: tuple[str, ...]) -> str:
    """Hash of every file of the pipeline's `components` folders (configs canonicalised, weights by content).

    Hashing reads every weight (gigabytes for SDXL), so the result is cached in
    `cache_dir()/fingerprints.json` under the folder's path and each file's name, size and
    mtime: any change to a file recomputes it.
    """
    files = _component_files(path, components)
    stats = [(f.relative_to(path).as_posix(), st.st_size, st.st_mtime_ns) for f in files for st in (f.stat(),)]
    key = hashlib.sha256(json.dumps([str(path.resolve()), stats]).encode()).hexdigest()
    cache_file = cache_dir() / FINGERPRINT_CACHE
    try:
        cached = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached, dict):
        cached = {}
    if key in cached:
        return cached[key]
    value = hash_files(path, files)
    cached[key] = value
    entries = dict(list(cached.items())[-FINGERPRINT_CACHE_ENTRIES:])
    try:  # the cache is a convenience: a read-only home costs one re-hash per start, no error
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries))
        os.replace(tmp, cache_file)
    except OSError:
        pass
    return value


def identify_model(path: Path) -> tuple[type[Family], str]:
    """The family of the pipeline folder `path` (after its checks) and its fingerprint, without loading it."""
    family, _ = family_for(path)
    return family, fingerprint(path, family.components)


def load_model(name_or_path: str | Path, device: str = "auto", dtype: str = "auto") -> ScanModel:
    """Load a text-to-image pipeline folder's text encoders and denoiser through its family adapter."""
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
