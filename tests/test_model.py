"""Model loading: local folders, the local HF cache, refusals with reasons, fingerprints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from scanner.errors import MemscanError
from scanner.model import fingerprint, load_model, resolve_dtype, resolve_model_path


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


def test_refuses_unsupported_pipelines(tmp_path, tiny_sd1):
    sdxl = tmp_path / "sdxl"
    shutil.copytree(tiny_sd1, sdxl)
    index = json.loads((sdxl / "model_index.json").read_text())
    (sdxl / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(MemscanError, match="SDXL"):
        load_model(sdxl, device="cpu")

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
    assert model.unet.dtype == torch.bfloat16 and model.text_encoder.dtype == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(MemscanError, match="no CUDA device"):
            load_model(tiny_sd1, device="cuda")

