"""ONNX Runtime engine: the denoiser exported with a norm head, and the text encoders, run on the CPU or CUDA provider.

Each export happens on its first call, when the input shapes are known, and is cached on disk
(`onnx_export.cached_export`, `cached_text_encoder_export`). Tensors are handed to ONNX Runtime
through IO binding by pointer, so nothing is copied between torch and a session on either device.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from ..onnx_session import open_session
from .base import Conditioning, DenoiserEngine, EngineUnavailable, TextEncoder
from .onnx_export import cached_export, cached_text_encoder_export, cond_spec

NUMPY_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}
# ONNX Runtime's names of its tensor types, for the outputs a text encoder session declares.
ORT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(int64)": torch.int64}


def bind(binding, name: str, tensor: torch.Tensor, output: bool = False) -> None:
    """Bind a contiguous torch tensor to a session's input or output `name` by pointer (no copy)."""
    device = tensor.device
    method = binding.bind_output if output else binding.bind_input
    method(name, device.type, device.index or 0, NUMPY_TYPES[tensor.dtype], list(tensor.shape), tensor.data_ptr())


class OnnxEngine(DenoiserEngine):
    """Runs the exported denoiser with ONNX Runtime; `conditional_norm` fetches only the `[R]` norms."""

    name = "onnx"

    def __init__(self, denoiser: torch.nn.Module, cache_dir: str | Path | None = None, cache_key: str | None = None):
        import onnxruntime

        param = next(denoiser.parameters())
        if param.dtype not in (torch.float32, torch.float16):
            raise EngineUnavailable(f"the onnx engine runs fp32 or fp16 models, not {param.dtype}")
        self.providers = self._providers(onnxruntime, param.device)
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

    def open(self, path: Path):
        """An ONNX Runtime session of the exported graph at `path` on this engine's provider."""
        return open_session(path, self.providers)

    def _session(self, latents: torch.Tensor, conditioning: Conditioning):
        spec = cond_spec(conditioning)
        shapes = (tuple(latents.shape[1:]), tuple(spec.items()))
        if shapes not in self._sessions:
            self._sessions[shapes] = self.open(cached_export(self.denoiser, shapes[0], spec, self.cache_dir, self.cache_key))
        return self._sessions[shapes]

    def _text_encoder(self, name: str, module: torch.nn.Module) -> TextEncoder:
        """The text encoder exported with the cache key `<model's key>-<name>` and run by ONNX Runtime."""
        return OnnxTextEncoder(self, module, f"{self.cache_key}-{name}")

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
        run_bound(session, inputs, {output: out})
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


def run_bound(session, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
    """Run `session` on `inputs`, writing into the preallocated `outputs` (all contiguous, on one device)."""
    binding = session.io_binding()
    for name, tensor in inputs.items():  # the caller's dicts keep the tensors alive until the run ends
        bind(binding, name, tensor)
    for name, tensor in outputs.items():
        bind(binding, name, tensor, output=True)
    device = next(iter(outputs.values())).device
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()  # ORT runs on its own stream
    session.run_with_iobinding(binding)
    binding.synchronize_outputs()


class OnnxTextEncoder:
    """A text encoder module (`forward(**inputs) -> tuple`, `output_names`) exported and run by ONNX Runtime.

    Exported on the first call, when the inputs' shapes are known, one session per input spec.
    """

    def __init__(self, engine: OnnxEngine, module: torch.nn.Module, cache_key: str):
        self.engine = engine
        self.module = module
        self.cache_key = cache_key
        self._sessions: dict[tuple, tuple] = {}  # input spec -> (session, [(output name, per-row shape, dtype)])

    def _session(self, inputs: dict[str, torch.Tensor]) -> tuple:
        spec = cond_spec(inputs)
        key = tuple(spec.items())
        if key not in self._sessions:
            path = cached_text_encoder_export(self.module, spec, self.engine.cache_dir, self.cache_key)
            session = self.engine.open(path)
            outputs = []
            for meta in session.get_outputs():
                # The export fixes every size but the batch: sizes are known before a run.
                if not all(isinstance(size, int) for size in meta.shape[1:]):
                    raise EngineUnavailable(f"{path}: output {meta.name} has sizes {meta.shape}; only the batch may vary")
                outputs.append((meta.name, tuple(meta.shape[1:]), ORT_TYPES[meta.type]))
            self._sessions[key] = (session, outputs)
        return self._sessions[key]

    def __call__(self, **inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The module's outputs for keyword inputs `[B, ...]`, in `output_names` order, on the engine's device."""
        device = self.engine.device
        inputs = {k: v.to(device).contiguous() for k, v in inputs.items()}
        session, metas = self._session(inputs)
        rows = len(next(iter(inputs.values())))
        outputs = {name: torch.empty(rows, *shape, dtype=dtype, device=device) for name, shape, dtype in metas}
        run_bound(session, inputs, outputs)
        return tuple(outputs[name] for name in self.module.output_names)
