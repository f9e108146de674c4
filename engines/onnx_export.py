"""Export a denoiser to ONNX with a fused score head, cached on disk by model and export settings.

The exported graph takes `latents [B, C, H, W]`, `timestep []` (fp32), `uncond [B|1, C, H, W]`
and the denoiser's conditioning tensors under their own names (`encoder_hidden_states
[B, L, D]`, `pooled_projections [B, P]`, ...), and has two outputs: `noise` (the denoiser's raw
output) and `norm` (`||noise - uncond||_2` per row, fp32). Asking a session for `norm` alone
keeps whole predictions on the device. The batch axis is dynamic; every other size is fixed
by the example shapes, so the export is keyed by them.
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

from .onnx_symbolics import register_symbolics

OPSET = 17
# Bump when the graph's inputs, outputs or exporter options change: old exports are then ignored.
EXPORT_FORMAT = 2
INPUT_NAMES = ("latents", "timestep", "uncond")  # then the conditioning's names
OUTPUT_NAMES = ("noise", "norm")
MODEL_FILE = "denoiser.onnx"
# name -> (shape without the batch axis, dtype name): the conditioning an export is traced for.
CondSpec = dict[str, tuple[tuple[int, ...], str]]


def cond_spec(conditioning: dict[str, torch.Tensor]) -> CondSpec:
    """The per-row shapes and dtypes of a conditioning, which key its export."""
    return {k: (tuple(v.shape[1:]), str(v.dtype).removeprefix("torch.")) for k, v in conditioning.items()}


class ScoringDenoiser(torch.nn.Module):
    """The denoiser with a conditional-minus-unconditional norm head: `(noise, norm)`."""

    def __init__(self, denoiser: torch.nn.Module, cond_names: tuple[str, ...]):
        super().__init__()
        self.denoiser = denoiser
        self.cond_names = cond_names

    def forward(
        self, latents: torch.Tensor, timestep: torch.Tensor, uncond: torch.Tensor, *conditioning: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The denoiser's prediction and each row's fp32 `||noise - uncond||_2`."""
        noise = self.denoiser(latents, timestep, **dict(zip(self.cond_names, conditioning)))
        return noise, (noise.float() - uncond.float()).flatten(1).norm(dim=1)


def export_settings(denoiser: torch.nn.Module, latent_shape: tuple[int, ...], spec: CondSpec) -> dict:
    """Everything besides the weights that decides the exported graph."""
    dtype = next(denoiser.parameters()).dtype
    return {
        "format": EXPORT_FORMAT,
        "opset": OPSET,
        "dtype": str(dtype).removeprefix("torch."),
        "latent_shape": list(latent_shape),
        "conditioning": {k: [list(shape), dt] for k, (shape, dt) in spec.items()},
        "torch": torch.__version__.split("+")[0],
    }


def export_denoiser(denoiser: torch.nn.Module, latent_shape: tuple[int, ...], spec: CondSpec, folder: Path) -> Path:
    """Export `ScoringDenoiser(denoiser)` into `folder` (weights as external data when over 2 GB)."""
    param = next(denoiser.parameters())

    def example(shape: tuple[int, ...], dtype: str) -> torch.Tensor:
        # Batch 2 for tracing: the exporter would specialise a batch of 1 to a constant.
        if dtype.startswith(("int", "bool")):  # masks: all ones, a valid mask
            return torch.ones(2, *shape, device=param.device, dtype=getattr(torch, dtype))
        return torch.randn(2, *shape, device=param.device, dtype=param.dtype)

    latents = torch.randn(2, *latent_shape, device=param.device, dtype=param.dtype)
    uncond = torch.randn(1, *latent_shape, device=param.device, dtype=param.dtype)
    conditioning = [example(shape, dtype) for shape, dtype in spec.values()]
    timestep = torch.tensor(981.0, device=param.device)
    batch = {0: "batch"}
    path = folder / MODEL_FILE
    # The TorchScript exporter: exact on diffusers' UNet and 10x faster than dynamo=True here,
    # with memscan's symbolics for what the transformer families need.
    register_symbolics(OPSET)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
        torch.onnx.export(
            ScoringDenoiser(denoiser, tuple(spec)).eval(),
            (latents, timestep, uncond, *conditioning),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[*INPUT_NAMES, *spec],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={
                "latents": batch, "uncond": {0: "uncond_batch"}, "noise": batch, "norm": batch, **{k: batch for k in spec}
            },
        )
    return path


def cached_export(
    denoiser: torch.nn.Module,
    latent_shape: tuple[int, ...],
    spec: CondSpec,
    cache_dir: Path,
    cache_key: str,
) -> Path:
    """The ONNX file for this model and these shapes: exported once into `cache_dir/onnx/`, then reused."""
    settings = export_settings(denoiser, latent_shape, spec)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    safe_key = "".join(c if c.isalnum() or c in "-_." else "_" for c in cache_key)
    target = Path(cache_dir) / "onnx" / f"{safe_key}-{digest}"
    if (target / MODEL_FILE).is_file():
        return target / MODEL_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    # Export into a private folder, then rename: readers never see a half-written export.
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        export_denoiser(denoiser, latent_shape, spec, staging)
        (staging / "settings.json").write_text(json.dumps({**settings, "cache_key": cache_key}, indent=2))
        try:
            os.rename(staging, target)
        except OSError:  # another process finished the same export first; use theirs
            if not (target / MODEL_FILE).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target / MODEL_FILE
