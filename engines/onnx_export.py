"""Export a denoiser (with a fused score head) and text encoders to ONNX, cached on disk by model and export settings.

The exported graph takes `latents [B, C, H, W]`, `timestep []` (fp32), `uncond [B|1, C, H, W]`
and the denoiser's conditioning tensors under their own names (`encoder_hidden_states
[B, L, D]`, `pooled_projections [B, P]`, ...), and has two outputs: `noise` (the denoiser's raw
output) and `norm` (`||noise - uncond||_2` per row, fp32). Asking a session for `norm` alone
keeps whole predictions on the device. The batch axis is dynamic; every other size is fixed
by the example shapes, so the export is keyed by them.

A text encoder module (`forward(**inputs) -> tuple`, with `output_names`: a family's
`TextEncoderModule`) exports with its inputs under their names (`input_ids [B, L]`, and
`attention_mask [B, L]` where the family passes one) and its outputs under `output_names`.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ..cache import artefact_folder, build_artefact
from .onnx_symbolics import fused_attention, register_symbolics, standard_attention

OPSET = 17
# Bump when the graph's inputs, outputs or exporter options change: old exports are then ignored.
EXPORT_FORMAT = 2
INPUT_NAMES = ("latents", "timestep", "uncond")  # then the conditioning's names
OUTPUT_NAMES = ("noise", "norm")
MODEL_FILE = "denoiser.onnx"
TEXT_ENCODER_FILE = "text_encoder.onnx"
TEXT_ENCODER_FORMAT = 1  # as EXPORT_FORMAT, for text encoder graphs
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


class NamedInputs(torch.nn.Module):
    """A module taking keyword tensors, called with them positionally (the exporter passes positional inputs)."""

    def __init__(self, module: torch.nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.module = module
        self.names = names

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`module(**dict(zip(names, tensors)))`."""
        return self.module(**dict(zip(self.names, tensors)))


def example(shape: tuple[int, ...], dtype: str, param: torch.Tensor) -> torch.Tensor:
    """A tracing input of per-row `shape` and `dtype` on `param`'s device, floats in `param`'s dtype."""
    # Batch 2 for tracing: the exporter would specialise a batch of 1 to a constant.
    if dtype.startswith(("int", "bool")):  # ids and masks: all ones, a valid token and a valid mask
        return torch.ones(2, *shape, device=param.device, dtype=getattr(torch, dtype))
    return torch.randn(2, *shape, device=param.device, dtype=param.dtype)


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
    latents = torch.randn(2, *latent_shape, device=param.device, dtype=param.dtype)
    uncond = torch.randn(1, *latent_shape, device=param.device, dtype=param.dtype)
    conditioning = [example(shape, dtype, param) for shape, dtype in spec.values()]
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


def text_encoder_settings(module: torch.nn.Module, spec: CondSpec) -> dict:
    """Everything besides the weights that decides a text encoder's exported graph."""
    dtype = next(module.parameters()).dtype
    return {
        "format": TEXT_ENCODER_FORMAT,
        "opset": OPSET,
        "dtype": str(dtype).removeprefix("torch."),
        "inputs": {k: [list(shape), dt] for k, (shape, dt) in spec.items()},
        "outputs": list(module.output_names),
        "torch": torch.__version__.split("+")[0],
    }


def export_text_encoder(module: torch.nn.Module, spec: CondSpec, folder: Path) -> Path:
    """Export the text encoder `module` for inputs `spec` into `folder` (weights as external data when over 2 GB)."""
    return export_named(module, spec, module.output_names, folder / TEXT_ENCODER_FILE)


def export_named(
    module: torch.nn.Module, spec: CondSpec, output_names: tuple[str, ...], path: Path, fuse_attention: bool = False
) -> Path:
    """Export `module(**inputs) -> tuple` for keyword inputs `spec` to `path`, inputs and outputs named, every one
    batched on a dynamic dim 0 (a text encoder; a scan plan's scorer); `fuse_attention`: attention as ONNX's fused
    opset-23 `Attention` (for ONNX Runtime's CPU: other runtimes may not have it)."""
    param = next(module.parameters())
    batch = {0: "batch"}
    register_symbolics(OPSET)
    fusing = fused_attention() if fuse_attention else contextlib.nullcontext()
    with warnings.catch_warnings(), torch.no_grad(), fusing:
        warnings.simplefilter("ignore")  # tracer warnings, as for the denoiser
        torch.onnx.export(
            NamedInputs(module, tuple(spec)).eval(),
            tuple(example(shape, dtype, param) for shape, dtype in spec.values()),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=list(spec),
            output_names=list(output_names),
            dynamic_axes={name: batch for name in (*spec, *output_names)},
        )
    if fuse_attention:
        standard_attention(path)
    return path


def cached_export(
    denoiser: torch.nn.Module,
    latent_shape: tuple[int, ...],
    spec: CondSpec,
    cache_dir: Path,
    cache_key: str,
) -> Path:
    """The denoiser's ONNX file for this model and these shapes: exported once into `cache_dir/onnx/`, then reused."""
    settings = export_settings(denoiser, latent_shape, spec)
    return _cached(settings, MODEL_FILE, lambda folder: export_denoiser(denoiser, latent_shape, spec, folder), cache_dir, cache_key)


def cached_text_encoder_export(module: torch.nn.Module, spec: CondSpec, cache_dir: Path, cache_key: str) -> Path:
    """The text encoder's ONNX file for these inputs, exported once into `cache_dir/onnx/` as the denoiser's is."""
    settings = text_encoder_settings(module, spec)
    return _cached(settings, TEXT_ENCODER_FILE, lambda folder: export_text_encoder(module, spec, folder), cache_dir, cache_key)


def _cached(settings: dict, filename: str, export: Callable[[Path], Path], cache_dir: Path, cache_key: str) -> Path:
    """`cache_dir/onnx/<key>-<settings hash>/<filename>`, made by `export(folder)` unless it exists."""

    def build(folder: Path) -> None:
        export(folder)
        (folder / "settings.json").write_text(json.dumps({**settings, "cache_key": cache_key}, indent=2))

    return build_artefact(artefact_folder(cache_dir, "onnx", cache_key, settings), filename, build) / filename
