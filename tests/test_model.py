"""Model loading: local folders, the local HF cache, refusals with reasons, fingerprints."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from scanner.errors import MemscanError
from scanner.families.stable_diffusion import StableDiffusion
from scanner.model import identify_model, load_model, resolve_dtype, resolve_model_path


def test_loads_from_local_hf_cache_without_network(tmp_path, tiny_sd1, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-sd" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_sd1, snapshot)
    (cache / "models--someone--tiny-sd" / "refs").mkdir()
    (cache / "models--someone--tiny-sd" / "refs" / "main").write_text(snapshot.name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    assert resolve_model_path("someone/tiny-sd") == snapshot
    model = load_model("someone/tiny-sd", device="cpu")
    assert model.fingerprint == fingerprint(tiny_sd1)
    with pytest.raises(MemscanError, match="not in the local Hugging Face cache"):
        resolve_model_path("someone/absent-model")


def fingerprint(path) -> str:
    """The fingerprint of a pipeline folder, as load_model records it."""
    return identify_model(path)[1]


@pytest.mark.parametrize(
    "pipeline, reason",
    [
        ("StableDiffusionImg2ImgPipeline", "StableDiffusionImg2ImgPipeline is not supported: image-to-image"),
        ("StableDiffusionXLInpaintPipeline", "inpainting"),
        ("StableDiffusionUpscalePipeline", "an upscaler"),
        ("TextToVideoSDPipeline", "a video model"),
        ("DDPMPipeline", "not conditioned on text"),
        ("KandinskyPipeline", "memscan scores the text-to-image pipelines FluxPipeline, PixArtAlphaPipeline"),
    ],
)
def test_refuses_other_pipelines_naming_class_and_reason(tmp_path, tiny_sd1, pipeline, reason):
    other = tmp_path / "other"
    shutil.copytree(tiny_sd1, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": pipeline}))
    with pytest.raises(MemscanError, match=reason):
        load_model(other, device="cpu")


def test_fingerprint_is_cached_by_path_size_and_mtime(tmp_path, tiny_sd1, monkeypatch):
    import scanner.checkpoint as model_module

    monkeypatch.setenv("MEMSCAN_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "copy"
    shutil.copytree(tiny_sd1, copy)
    hashed = []
    real = model_module.hash_files
    monkeypatch.setattr(model_module, "hash_files", lambda *args: hashed.append(args[0]) or real(*args))
    first = fingerprint(copy)
    assert fingerprint(copy) == first and len(hashed) == 1  # the second start reads no weight
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same bytes
    assert fingerprint(copy) == first and len(hashed) == 2
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, other content, a new mtime
    weights.write_bytes(bytes(data))
    assert fingerprint(copy) != first and len(hashed) == 3
    (copy / "scheduler" / "extra.txt").write_text("x")  # a new file in a component
    fingerprint(copy)
    assert len(hashed) == 4
    assert fingerprint(tiny_sd1) == real(tiny_sd1, model_module.component_files(tiny_sd1, StableDiffusion.components))


def test_refuses_unsupported_pipelines(tmp_path, tiny_sd1):
    unconditional = tmp_path / "uncond"
    shutil.copytree(tiny_sd1, unconditional)
    config = json.loads((unconditional / "unet" / "config.json").read_text())
    config["_class_name"] = "UNet2DModel"
    (unconditional / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(MemscanError, match="text-conditioned UNet2DConditionModel"):
        load_model(unconditional, device="cpu")

    broken_index = tmp_path / "broken_index"
    shutil.copytree(tiny_sd1, broken_index)
    (broken_index / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline",')
    with pytest.raises(MemscanError, match=r"model_index\.json is not valid JSON"):
        load_model(broken_index, device="cpu")
    (broken_index / "model_index.json").write_text('["StableDiffusionXLPipeline"]')  # not an object: names no pipeline
    assert load_model(broken_index, device="cpu").fingerprint == fingerprint(tiny_sd1)

    no_tokenizer = tmp_path / "partial"
    shutil.copytree(tiny_sd1, no_tokenizer)
    shutil.rmtree(no_tokenizer / "tokenizer")
    with pytest.raises(MemscanError, match="missing tokenizer/"):
        load_model(no_tokenizer, device="cpu")


def test_fingerprint_follows_weights_not_json_layout(tmp_path, tiny_sd1):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_sd1, copy)
    config_file = copy / "unet" / "config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()), indent=None, sort_keys=False))
    assert fingerprint(copy) == fingerprint(tiny_sd1)
    weights = next((copy / "unet").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert fingerprint(copy) != fingerprint(tiny_sd1)


def test_dtypes_and_devices(tiny_sd1):
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    with pytest.raises(MemscanError, match="fp16 is not supported on the CPU"):
        resolve_dtype("fp16", cpu)
    model = load_model(tiny_sd1, device="cpu", dtype="bf16")
    assert model.denoiser.dtype == torch.bfloat16 and model.family.text_encoders["text_encoder"].dtype == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(MemscanError, match="no CUDA device"):
            load_model(tiny_sd1, device="cuda")

