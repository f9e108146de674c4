"""Export a UNet to ONNX with a fused score head, cached on disk by model and export settings.

The exported graph takes `latents [B, C, H, W]`, `timestep []` (fp32), `text_embeddings
[B, L, D]` and `uncond [B|1, C, H, W]` and has two outputs: `noise` (the UNet's raw output)
and `norm` (`||noise - uncond||_2` per row, fp32). Asking a session for `norm` alone keeps
whole predictions on the device. The batch axis is dynamic; C, H, W, L, D are fixed by the
example shapes, so the export is keyed by them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

OPSET = 17
# Bump when the graph's inputs, outputs or exporter options change: old exports are then ignored.
EXPORT_FORMAT = 1
INPUT_NAMES = ("latents", "timestep", "text_embeddings", "uncond")
OUTPUT_NAMES = ("noise", "norm")
MODEL_FILE = "unet.onnx"


class ScoringUNet(torch.nn.Module):
    """The UNet with a conditional-minus-unconditional norm head: `(noise, norm)`."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(
        self, latents: torch.Tensor, timestep: torch.Tensor, text_embeddings: torch.Tensor, uncond: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The UNet's noise prediction and each row's fp32 `||noise - uncond||_2`."""
        noise = self.unet(latents, timestep, encoder_hidden_states=text_embeddings, return_dict=False)[0]
        return noise, (noise.float() - uncond.float()).flatten(1).norm(dim=1)


def export_settings(unet: torch.nn.Module, latent_shape: tuple[int, ...], text_shape: tuple[int, ...]) -> dict:
    """Everything besides the weights that decides the exported graph."""
    dtype = next(unet.parameters()).dtype
    return {
        "format": EXPORT_FORMAT,
        "opset": OPSET,
        "dtype": str(dtype).removeprefix("torch."),
        "latent_shape": list(latent_shape),
        "text_shape": list(text_shape),
        "torch": torch.__version__.split("+")[0],
    }


def export_unet(unet: torch.nn.Module, latent_shape: tuple[int, ...], text_shape: tuple[int, ...], folder: Path) -> Path:
    """Export `ScoringUNet(unet)` into `folder` (weights as external data when over 2 GB)."""
    param = next(unet.parameters())
    # Batch 2 for tracing: the exporter would specialise a batch of 1 to a constant.
    latents = torch.randn(2, *latent_shape, device=param.device, dtype=param.dtype)
    text = torch.randn(2, *text_shape, device=param.device, dtype=param.dtype)
    uncond = torch.randn(1, *latent_shape, device=param.device, dtype=param.dtype)
    timestep = torch.tensor(981.0, device=param.device)
    batch = {0: "batch"}
    path = folder / MODEL_FILE
    # The TorchScript exporter: exact on diffusers' UNet and 10x faster than dynamo=True here.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
        torch.onnx.export(
            ScoringUNet(unet).eval(),
            (latents, timestep, text, uncond),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={"latents": batch, "text_embeddings": batch, "uncond": {0: "uncond_batch"}, "noise": batch, "norm": batch},
        )
    return path


def cached_export(
    unet: torch.nn.Module,
    latent_shape: tuple[int, ...],
    text_shape: tuple[int, ...],
    cache_dir: Path,
    cache_key: str,
) -> Path:
    """The ONNX file for this model and these shapes: exported once into `cache_dir/onnx/`, then reused."""
    settings = export_settings(unet, latent_shape, text_shape)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    safe_key = "".join(c if c.isalnum() or c in "-_." else "_" for c in cache_key)
    target = Path(cache_dir) / "onnx" / f"{safe_key}-{digest}"
    if (target / MODEL_FILE).is_file():
        return target / MODEL_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    # Export into a private folder, then rename: readers never see a half-written export.
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        export_unet(unet, latent_shape, text_shape, staging)
        (staging / "settings.json").write_text(json.dumps({**settings, "cache_key": cache_key}, indent=2))
        try:
            os.rename(staging, target)
        except OSError:  # another process finished the same export first; use theirs
            if not (target / MODEL_FILE).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target / MODEL_FILE
