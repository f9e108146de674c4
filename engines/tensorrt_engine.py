"""TensorRT engine: built from the ONNX export (FP16, one profile over the batch buckets).

The serialized engine is cached under `cache_dir/tensorrt/`, keyed by the model, the export
settings, the GPU's name and the TensorRT version (an engine runs only where it was built);
a timing cache per GPU and version makes later builds faster. It runs with
`execute_async_v3` on the current torch stream; each batch bucket is captured once in a CUDA
graph and replayed, batches padded to the bucket as in the compile engine.

The text encoders run eagerly with this engine (`DenoiserEngine.text_encoder`'s default): a
TensorRT build of theirs would need its own profiles and runners (int64 ids in, no norm head).

Not verified on a GPU yet (see docs/engines.md): written against the TensorRT 10 Python API.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch

from .base import Conditioning, DenoiserEngine, EngineUnavailable
from .compile_engine import BUCKETS, bucket_for, pad_rows
from .onnx_export import INPUT_NAMES, CondSpec, cached_export, cond_spec


def _import_tensorrt():
    try:
        import tensorrt
    except ImportError as exc:
        raise EngineUnavailable(f"tensorrt engine needs TensorRT: pip install tensorrt ({exc})") from None
    return tensorrt


class _BucketRunner:
    """Static input/output buffers of one bucket and its captured CUDA graph."""

    def __init__(self, context, rows: int, latent_shape, spec: CondSpec, dtype, device):
        def buffer(shape, dt: str) -> torch.Tensor:
            floating = not dt.startswith(("int", "bool"))
            return (torch.zeros if floating else torch.ones)(rows, *shape, dtype=dtype if floating else getattr(torch, dt), device=device)

        self.inputs = {
            "latents": torch.zeros(rows, *latent_shape, dtype=dtype, device=device),
            "timestep": torch.zeros((), dtype=torch.float32, device=device),
            "uncond": torch.zeros(rows, *latent_shape, dtype=dtype, device=device),
            **{name: buffer(shape, dt) for name, (shape, dt) in spec.items()},
        }
        self.outputs = {
            "noise": torch.empty(rows, *latent_shape, dtype=dtype, device=device),
            "norm": torch.empty(rows, dtype=torch.float32, device=device),
        }
        self.context = context
        self.graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            self._bind()
            self.context.execute_async_v3(stream.cuda_stream)  # first run allocates; graphs need a warm run
            with torch.cuda.graph(self.graph, stream=stream):
                self.context.execute_async_v3(stream.cuda_stream)
        torch.cuda.current_stream(device).wait_stream(stream)

    def _bind(self) -> None:
        for name, tensor in {**self.inputs, **self.outputs}.items():
            if name in self.inputs:
                self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())

    def run(self, latents, timestep, conditioning: Conditioning, uncond) -> dict[str, torch.Tensor]:
        """Copy the padded inputs into the static buffers, replay the graph; outputs are views."""
        rows = len(self.inputs["latents"])
        self.inputs["latents"].copy_(pad_rows(latents, rows))
        self.inputs["timestep"].copy_(torch.as_tensor(timestep, dtype=torch.float32))
        for name, tensor in conditioning.items():
            self.inputs[name].copy_(pad_rows(tensor, rows))
        self.inputs["uncond"].copy_(pad_rows(uncond, rows))  # [1] rows repeat too
        # The graph replays with this bucket's shapes and buffer addresses baked in; buckets share
        # the context's scratch memory, which is safe because they replay in turn on one stream.
        self.graph.replay()
        return self.outputs


class TensorRTEngine(DenoiserEngine):
    """Runs a TensorRT engine built from the ONNX export; fp16, CUDA only."""

    name = "tensorrt"

    def __init__(self, denoiser: torch.nn.Module, cache_dir: str | Path | None = None, cache_key: str | None = None):
        self.trt = _import_tensorrt()
        param = next(denoiser.parameters())
        if param.device.type != "cuda":
            raise EngineUnavailable("tensorrt engine needs the model on a CUDA device (--device cuda)")
        if param.dtype != torch.float16:
            raise EngineUnavailable("tensorrt engine builds FP16 engines: load the model with --dtype fp16")
        self.denoiser = denoiser
        self.device = param.device
        self.dtype = param.dtype
        if cache_dir is None or cache_key is None:
            self._private = tempfile.TemporaryDirectory(prefix="memscan-trt-")
            cache_dir, cache_key = self._private.name, "uncached"
        self.cache_dir = Path(cache_dir)
        self.cache_key = cache_key
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self._engines: dict[tuple, tuple] = {}  # shapes -> (engine, context, {bucket: runner})

    # -- building -------------------------------------------------------------------------
    def _plan_path(self, onnx_path: Path) -> Path:
        gpu = torch.cuda.get_device_name(self.device)
        key = f"{onnx_path.parent.name}|{gpu}|{self.trt.__version__}|{BUCKETS}"
        return self.cache_dir / "tensorrt" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.plan"

    def _timing_cache_path(self) -> Path:
        gpu = "".join(c if c.isalnum() else "_" for c in torch.cuda.get_device_name(self.device))
        return self.cache_dir / "tensorrt" / f"timing-{gpu}-{self.trt.__version__}.cache"

    def _build(self, onnx_path: Path, latent_shape, spec: CondSpec) -> bytes:
        trt = self.trt
        builder = trt.Builder(self.logger)
        network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineUnavailable(f"TensorRT could not parse {onnx_path}: {errors}")
        config = builder.create_builder_config()
        config.set_flag(trt.BuilderFlag.FP16)
        timing_path = self._timing_cache_path()
        timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
        config.set_timing_cache(timing, ignore_mismatch=False)
        profile = builder.create_optimization_profile()
        low, mid, high = BUCKETS[0], BUCKETS[len(BUCKETS) // 2], BUCKETS[-1]
        shapes = {"latents": latent_shape, "uncond": latent_shape, **{k: shape for k, (shape, _) in spec.items()}}
        for name, shape in shapes.items():
            profile.set_shape(name, (low, *shape), (mid, *shape), (high, *shape))
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise EngineUnavailable(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
        _write_atomic(timing_path, bytes(config.get_timing_cache().serialize()))
        return bytes(plan)

    def _engine(self, latents: torch.Tensor, spec: CondSpec) -> tuple:
        key = (tuple(latents.shape[1:]), tuple(spec.items()))
        if key not in self._engines:
            onnx_path = cached_export(self.denoiser, key[0], spec, self.cache_dir, self.cache_key)
            plan_path = self._plan_path(onnx_path)
            if not plan_path.is_file():
                plan_path.parent.mkdir(parents=True, exist_ok=True)
                _write_atomic(plan_path, self._build(onnx_path, key[0], spec))
            engine = self.trt.Runtime(self.logger).deserialize_cuda_engine(plan_path.read_bytes())
            names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
            if not {*INPUT_NAMES, *spec} <= names:
                raise EngineUnavailable(f"{plan_path}: engine lacks inputs {({*INPUT_NAMES, *spec}) - names}; delete it")
            self._engines[key] = (engine, engine.create_execution_context(), {})
        return self._engines[key]

    def _run(self, latents, timestep, conditioning: Conditioning, uncond) -> dict[str, torch.Tensor]:
        conditioning = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in conditioning.items()}
        spec = cond_spec(conditioning)
        _, context, runners = self._engine(latents, spec)
        rows = bucket_for(len(latents))
        if rows not in runners:
            runners[rows] = _BucketRunner(context, rows, latents.shape[1:], spec, self.dtype, self.device)
        return runners[rows].run(latents, timestep, conditioning, uncond)

    # -- the engine interface ------------------------------------------------------------------
    def _chunks(self, latents, conditioning: Conditioning):
        largest = BUCKETS[-1]
        for start in range(0, len(latents), largest):
            yield start, latents[start : start + largest], {k: v[start : start + largest] for k, v in conditioning.items()}

    def predict(self, latents: torch.Tensor, timestep: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The denoiser's raw output for latents `[R, C, H, W]`, one timestep, conditioning rows `[R, ...]`."""
        zero = torch.zeros((1, *latents.shape[1:]), dtype=self.dtype, device=self.device)
        parts = [self._run(x, timestep, c, zero)["noise"][: len(x)].clone() for _, x, c in self._chunks(latents, conditioning)]
        return torch.cat(parts)

    def conditional_norm(
        self, latents: torch.Tensor, timestep: torch.Tensor, conditioning: Conditioning, uncond: torch.Tensor
    ) -> torch.Tensor:
        """`||predict(latents, t, c) - uncond||_2` per row, fp32 `[R]`, from the engine's norm head."""
        parts = []
        for start, x, c in self._chunks(latents, conditioning):
            u = uncond if len(uncond) == 1 else uncond[start : start + len(x)]
            parts.append(self._run(x, timestep, c, u)["norm"][: len(x)].clone())
        return torch.cat(parts)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
