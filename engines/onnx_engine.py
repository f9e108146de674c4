"""ONNX Runtime engine: the denoiser exported with a norm head, run on the CPU or CUDA provider.

The export happens on the first call, when the latent and conditioning shapes are known, and is
cached on disk (`onnx_export.cached_export`). Tensors are handed to ONNX Runtime through IO
binding by pointer, so nothing is copied between torch and the session on either device.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from .base import Conditioning, DenoiserEngine, EngineUnavailable
from .onnx_export import cached_export, cond_spec

NUMPY_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


class OnnxEngine(DenoiserEngine):
    """Runs the exported denoiser with ONNX Runtime; `conditional_norm` fetches only the `[R]` norms."""

    name = "onnx"

    def __init__(self, denoiser: torch.nn.Module, cache_dir: str | Path | None = None, cache_key: str | None = None):
        import onnxruntime

        param = next(denoiser.parameters())
        if param.dtype not in (torch.float32, torch.float16):
            raise EngineUnavailable(f"the onnx engine runs fp32 or fp16 models, not {param.dtype}")
        self.providers = self._providers(onnxruntime, param.device)
        self.ort = onnxruntime
        self.denoiser = denoiser
        self.device = param.device
        self.dtype = param.dtype
        if cache_dir is None or cache_key is None:  # nothing identifies the weights: keep the export private
            self._private = tempfile.TemporaryDirectory(prefix="memscan-onnx-")
            cache_dir, cache_key = self._private.name, "uncached"
        self.cache_dir = Path(cache_dir)
        self.cache_key = cache_key
        self._sessions: dict[tuple, object] = {}

    @staticmethod
    def _providers(onnxruntime, device: torch.device) -> list:
        available = onnxruntime.get_available_providers()
        if device.type == "cpu":
            return ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in available:
            return [("CUDAExecutionProvider", {"device_id": device.index or 0})]
        raise EngineUnavailable(
            f"the onnx engine on {device} needs onnxruntime-gpu (CUDAExecutionProvider); this onnxruntime has "
            f"{', '.join(available)}"
        )

    def _session(self, latents: torch.Tensor, conditioning: Conditioning):
        spec = cond_spec(conditioning)
        shapes = (tuple(latents.shape[1:]), tuple(spec.items()))
        if shapes not in self._sessions:
            path = cached_export(self.denoiser, shapes[0], spec, self.cache_dir, self.cache_key)
            options = self.ort.SessionOptions()
            options.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            # Idle ORT threads spin by default, holding cores that the torch text encoder
            # needs between UNet calls.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self._sessions[shapes] = self.ort.InferenceSession(str(path), options, providers=self.providers)
        return self._sessions[shapes]

    def _bind(self, binding, name: str, tensor: torch.Tensor) -> None:
        binding.bind_input(
            name,
            self.device.type,
            self.device.index or 0,
            NUMPY_TYPES[tensor.dtype],
            list(tensor.shape),
            tensor.data_ptr(),
        )

    def _run(
        self, output: str, out: torch.Tensor, latents: torch.Tensor, timestep: torch.Tensor, conditioning: Conditioning,
        uncond: torch.Tensor,
    ) -> torch.Tensor:
        """Run the graph, writing its `output` into the preallocated `out`."""
        conditioning = {k: v if not v.is_floating_point() else v.to(self.dtype) for k, v in conditioning.items()}
        session = self._session(latents, conditioning)
        inputs = {
            "latents": latents.to(self.device, self.dtype).contiguous(),
            "timestep": torch.as_tensor(timestep, dtype=torch.float32, device=self.device).reshape(()).contiguous(),
            "uncond": uncond.to(self.device, self.dtype).contiguous(),
            **{k: v.to(self.device).contiguous() for k, v in conditioning.items()},
        }
        binding = session.io_binding()
        for name, tensor in inputs.items():  # `inputs` keeps the tensors alive until the run ends
            self._bind(binding, name, tensor)
        binding.bind_output(output, self.device.type, self.device.index or 0, NUMPY_TYPES[out.dtype], list(out.shape), out.data_ptr())
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # ORT runs on its own stream
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return out

    def predict(self, latents: torch.Tensor, timestep: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The denoiser's raw output for latents `[R, C, H, W]`, one timestep, conditioning rows `[R, ...]`."""
        out = torch.empty(latents.shape, dtype=self.dtype, device=self.device)
        no_uncond = torch.zeros((1, *latents.shape[1:]), dtype=self.dtype, device=self.device)
        return self._run("noise", out, latents, timestep, conditioning, no_uncond)

    def conditional_norm(
        self, latents: torch.Tensor, timestep: torch.Tensor, conditioning: Conditioning, uncond: torch.Tensor
    ) -> torch.Tensor:
        """`||predict(latents, t, c) - uncond||_2` per row, fp32 `[R]`, from the graph's norm head."""
        out = torch.empty(len(latents), dtype=torch.float32, device=self.device)
        return self._run("norm", out, latents, timestep, conditioning, uncond)
