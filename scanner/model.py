"""Load a Stable Diffusion 1.x / 2.x checkpoint (diffusers layout) for scanning.

A checkpoint is a folder in the `StableDiffusionPipeline` layout (`tokenizer/`,
`text_encoder/`, `unet/`, `scheduler/`, optionally `vae/`), or a hub id already in the
local Hugging Face cache. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import MemscanError

REQUIRED_COMPONENTS = ("tokenizer", "text_encoder", "unet", "scheduler")
# Pipelines whose UNet needs more than one text embedding (SDXL's pooled and time ids) or
# has no text cross-attention: the method's single-embedding CFG does not apply to them.
UNSUPPORTED_PIPELINES = {
    "StableDiffusionXLPipeline": "SDXL (two text encoders, added conditions)",
    "StableDiffusion3Pipeline": "SD3 (a transformer, not a UNet)",
    "FluxPipeline": "Flux (a transformer, not a UNet)",
    "StableDiffusionUpscalePipeline": "an upscaler (image-conditioned)",
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ScanModel:
    """The components the scanner needs, on one device and dtype, plus the fingerprint."""

    tokenizer: Any
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    scheduler_config: dict
    vae: torch.nn.Module | None
    fingerprint: str
    source: str
    device: torch.device
    dtype: torch.dtype

    @property
    def prediction_type(self) -> str:
        """What the UNet predicts: `epsilon`, `v_prediction` or `sample`."""
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one latent at the UNet's native resolution."""
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return (cfg.in_channels, size, size)


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


def check_layout(path: Path) -> None:
    """Refuse folders that are not a supported text-to-image UNet pipeline, with the reason."""
    index_file = path / "model_index.json"
    if index_file.is_file():
        index = _read_json(index_file)
        # Only read to name unsupported pipelines: components load one by one without it.
        pipeline = index.get("_class_name", "") if isinstance(index, dict) else ""
        if pipeline in UNSUPPORTED_PIPELINES:
            raise MemscanError(f"{path}: {pipeline} is not supported: {UNSUPPORTED_PIPELINES[pipeline]}")
    missing = [c for c in REQUIRED_COMPONENTS if not (path / c).is_dir()]
    if missing:
        raise MemscanError(f"{path}: not a Stable Diffusion pipeline folder (missing {', '.join(missing)}/)")
    if (path / "text_encoder_2").is_dir():
        raise MemscanError(f"{path}: pipelines with two text encoders (SDXL) are not supported")
    unet_config = _read_json(path / "unet" / "config.json")
    if unet_config.get("_class_name") != "UNet2DConditionModel" or not unet_config.get("cross_attention_dim"):
        raise MemscanError(
            f"{path}: the UNet is {unet_config.get('_class_name', 'unknown')}; memscan needs a "
            "text-conditioned UNet2DConditionModel (cross-attention, classifier-free guidance)"
        )
    if unet_config.get("addition_embed_type"):
        raise MemscanError(f"{path}: UNets with added conditions ({unet_config['addition_embed_type']}) are not supported")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise MemscanError(f"{path} is missing") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MemscanError(f"{path} is not valid JSON: {exc}") from exc


def fingerprint(path: Path) -> str:
    """Hash of every file of the pipeline's components (configs canonicalised, weights by content)."""
    digest = hashlib.sha256()
    components = [c for c in (*REQUIRED_COMPONENTS, "vae") if (path / c).is_dir()]
    for component in components:
        for file in sorted(p for p in (path / component).rglob("*") if p.is_file()):
            rel = file.relative_to(path).as_posix()
            digest.update(rel.encode() + b"\0")
            if file.suffix == ".json":
                # Key order and whitespace must not change the fingerprint.
                digest.update(json.dumps(_read_json(file), sort_keys=True).encode())
            else:
                with file.open("rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        digest.update(block)
    return "sha256:" + digest.hexdigest()[:16]


def load_model(name_or_path: str | Path, device: str = "auto", dtype: str = "auto") -> ScanModel:
    """Load tokenizer, text encoder, UNet, scheduler config (and VAE) for scanning."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    path = resolve_model_path(name_or_path)
    check_layout(path)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder")
        unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=torch_dtype)
        vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=torch_dtype) if (path / "vae").is_dir() else None
    except (OSError, ValueError, RuntimeError) as exc:
        raise MemscanError(f"{path}: could not load the pipeline: {str(exc).splitlines()[0]}") from exc
    if text_encoder.config.hidden_size != unet.config.cross_attention_dim:
        raise MemscanError(
            f"{path}: text encoder width {text_encoder.config.hidden_size} does not match the UNet's "
            f"cross_attention_dim {unet.config.cross_attention_dim}"
        )
    text_encoder.to(dtype=torch_dtype)  # diffusers models were loaded in torch_dtype already
    for module in (text_encoder, unet, vae):
        if module is not None:
            module.to(device=dev).eval().requires_grad_(False)
    return ScanModel(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=unet,
        scheduler_config=dict(_read_json(path / "scheduler" / "scheduler_config.json")),
        vae=vae,
        fingerprint=fingerprint(path),
        source=str(path),
        device=dev,
        dtype=torch_dtype,
    )
