"""Engines against torch eager: the same scores in fp32 on the CPU, for every family, with the text encoders run by
the engine too; the ONNX export cache."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from scanner.detect import DetectSettings, Scanner
from scanner.engines import ENGINES, EngineUnavailable, create_engine
from scanner.engines.compile_engine import bucket_for, in_buckets, pad_rows
from scanner.engines.onnx_export import MODEL_FILE, OPSET, TEXT_ENCODER_FILE
from scanner.engines.onnx_symbolics import register_symbolics
from scanner.model import load_model
from scanner.testbed import default_model_path

SETTINGS = {"first step": {}, "2-step window, 2 generations": {"end_step": 2, "generations": 2}}
# The tiny pipeline builders of the families besides SD 1.x/2.x (tests/tiny_families_*.py).
FAMILIES = ("sdxl", "pixart", "sd3", "flux")  # tiny random pipelines (conftest `tiny_family`; SD3 with T5)


def _prompts(rng: np.random.Generator, count: int) -> list[str]:
    words = ["a", "photo", "of", "red", "cat", "castle", "at", "night", "oil", "painting", "portrait"]
    return [" ".join(rng.choice(words, size=rng.integers(1, 12))) + f" {i}" for i in range(count)]


@pytest.fixture(scope="module", params=["sd1", "sd2", "testbed"])
def model(request, tiny_sd1, tiny_sd2):
    """Random SD 1.x- and 2.x-shaped models and the bundled testbed (trained, fp16 weights loaded as fp32)."""
    return load_model({"sd1": tiny_sd1, "sd2": tiny_sd2, "testbed": default_model_path()}[request.param], device="cpu")


@pytest.fixture(scope="module", params=FAMILIES)
def family_path(request, tiny_family) -> tuple[str, Path]:
    """A family's name and its saved tiny random pipeline (SDXL, PixArt-α, SD3 with T5, Flux)."""
    return request.param, tiny_family(request.param)


@pytest.fixture(scope="module")
def onnx_by_family(tmp_path_factory) -> dict:
    """Each family's (model, ONNX engine), kept for the module once made: pytest interleaves the cases of the
    family fixture's own parameters and of the indirect ones, and would otherwise export a family again."""
    return {}


@pytest.fixture(scope="module")
def family_onnx(family_path, onnx_by_family, tmp_path_factory):
    """The family's model and its ONNX engine, denoiser and text encoders exported once for every case (the exports are the cost)."""
    name, path = family_path
    if name not in onnx_by_family:
        model = load_model(path, device="cpu")
        cache = tmp_path_factory.mktemp("onnx-cache")
        onnx_by_family[name] = model, create_engine("onnx", model.family.denoiser_module(), cache_dir=cache, cache_key=model.fingerprint)
    return onnx_by_family[name]


def _assert_same_scores(model, engine, **settings) -> None:
    """Eager and `engine` agree on random prompts, with latents from a fresh random seed."""
    settings = DetectSettings(**settings, seed=random.randrange(2**31))
    prompts = _prompts(np.random.default_rng(), 6)
    # The engine first: an export that fails does so before the eager reference is paid for.
    got = Scanner(model, settings, engine=engine).score(prompts).per_generation
    expected = Scanner(model, settings).score(prompts).per_generation
    np.testing.assert_allclose(got, expected, rtol=1e-4, err_msg=f"seed {settings.seed}, prompts {prompts}")


def _assert_text_encoders_run_in_onnx_runtime(model, engine, monkeypatch) -> None:
    """With every eager text encoder made to raise, the engine's scanner encodes as eager did and scores alike."""
    settings = DetectSettings(seed=random.randrange(2**31))
    prompts = _prompts(np.random.default_rng(), 3)
    tokens = {n: model.family.tokenize(prompts[:n]) for n in (1, 3)}  # not the traced batch of 2
    eager = {n: model.family.encode_tokens(t) for n, t in tokens.items()}
    expected = Scanner(model, settings).score(prompts).per_generation  # the unconditional encoding is eager, once
    scanner = Scanner(model, settings, engine=engine)
    scanner.score(["a warm-up prompt"])  # exports the text encoders where no earlier test has

    def eager_forward(*args, **kwargs):
        raise AssertionError("the eager text encoder ran")

    for encoder in filter(None, model.family.text_encoders.values()):
        monkeypatch.setattr(encoder, "forward", eager_forward)
    for n, t in tokens.items():
        torch.testing.assert_close(scanner.encode_tokens(t), eager[n], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(scanner.score(prompts).per_generation, expected, rtol=1e-4, err_msg=f"seed {settings.seed}")


def test_onnx_engine_runs_the_text_encoders_on_every_family(family_onnx, monkeypatch):
    """Every text encoder a family has (SDXL's two CLIPs, SD3's CLIPs and T5, Flux's CLIP and T5, PixArt's masked T5)."""
    _assert_text_encoders_run_in_onnx_runtime(*family_onnx, monkeypatch)


@pytest.fixture(scope="module")
def onnx_engine(model, tmp_path_factory):
    """`model`'s ONNX engine, denoiser and text encoder exported once for every case."""
    cache = tmp_path_factory.mktemp("onnx-cache")
    return create_engine("onnx", model.family.denoiser_module(), cache_dir=cache, cache_key=model.fingerprint)


@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
def test_onnx_scores_match_torch(model, onnx_engine, settings):
    _assert_same_scores(model, onnx_engine, **settings)


def test_onnx_engine_runs_the_text_encoder(model, onnx_engine, monkeypatch):
    _assert_text_encoders_run_in_onnx_runtime(model, onnx_engine, monkeypatch)


# Flux's window case is the default suite's slowest test (half a minute); SD3 takes a flow trajectory through ONNX there.
FAMILY_CASES = [
    pytest.param(family, settings, id=f"{family}-{name}",
                 marks=[pytest.mark.slow] if family == "flux" and settings else [])
    for family in FAMILIES for name, settings in SETTINGS.items()
]


@pytest.mark.parametrize(("family_path", "settings"), FAMILY_CASES, indirect=["family_path"])
def test_onnx_scores_match_torch_on_every_family(family_onnx, settings):
    """The denoiser module of each family exports with its own conditioning (PixArt's: an int64 attention mask)."""
    model, engine = family_onnx
    _assert_same_scores(model, engine, **settings)


class _FluxQuery(torch.nn.Module):
    """What Flux's attention does to a query: split the heads, RMS-normalize them, reshape by the query's shape."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.RMSNorm(4)
        torch.nn.init.normal_(self.norm.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.norm(x.unflatten(-1, (-1, 4)))
        return q.reshape(*q.shape[:-1], -1, 2).flatten(3)


def test_onnx_symbolics_export_rms_norm_and_unflatten_with_a_dynamic_batch(tmp_path):
    import onnxruntime

    module, path = _FluxQuery().eval(), tmp_path / "query.onnx"
    register_symbolics(OPSET)
    torch.onnx.export(module, (torch.randn(2, 5, 8),), str(path), dynamo=False, opset_version=OPSET,
                      input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for rows in (1, 3):  # not the traced batch of 2
        x = torch.randn(rows, 5, 8)
        with torch.no_grad():
            expected = module(x).numpy()
        np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], expected, rtol=1e-5, atol=1e-6)


class _Attention(torch.nn.Module):
    """`scaled_dot_product_attention` of projected `[B, S, C]` rows, as diffusers' and transformers' processors call it."""

    def __init__(self, heads: int, width: int, mask: str, causal: bool, scale: float | None):
        super().__init__()
        self.heads, self.mask, self.causal, self.scale = heads, mask, causal, scale
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(width, width) for _ in range(3))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(t.size(0), -1, self.heads, t.size(-1) // self.heads).transpose(1, 2)

        keys = x if self.causal else context
        mask = None
        if self.mask == "bool":  # rows attend to the first key and to keys not greater than them in the first feature
            mask = ((keys[:, None, :, 0] <= x[:, :, None, 0]) | (torch.arange(keys.size(1)) == 0)).unsqueeze(1)
        elif self.mask == "float":
            mask = keys[:, None, None, :, 1] * 3
        elif self.mask == "per-query":  # one value for all of a query's keys: broadcast over the keys
            mask = x[:, None, :, None, 1] * 3
        out = torch.nn.functional.scaled_dot_product_attention(
            split(self.to_q(x)), split(self.to_k(keys)), split(self.to_v(keys)), attn_mask=mask, is_causal=self.causal,
            scale=self.scale,
        )
        return out.transpose(1, 2).reshape(x.shape)


@pytest.mark.parametrize(("mask", "causal", "scale", "fused"), [
    ("none", False, None, True), ("none", True, None, True), ("bool", False, None, True), ("float", False, 0.3, True),
    ("per-query", False, None, False),  # ONNX Runtime's kernel takes no mask broadcast over the keys: torch's ops
])
def test_fused_attention_exports_one_attention_node_that_matches_float64(tmp_path, mask, causal, scale, fused):
    """Cross-attention over another length (or causal self-attention), boolean or additive masks, a given scale."""
    import onnx
    import onnxruntime

    from scanner.engines.onnx_export import export_named

    rng = random.Random()
    heads, length = rng.choice([1, 2, 4]), rng.randint(5, 9)
    module = _Attention(heads, heads * 4, mask, causal, scale).eval()
    spec = {"x": ((length, heads * 4), "float32")} | ({} if causal else {"context": ((length + 3, heads * 4), "float32")})
    path = export_named(module, spec, ("out",), tmp_path / "attention.onnx", fuse_attention=True)
    graph = onnx.load(str(path))
    ops = [node.op_type for node in graph.graph.node]
    assert (ops.count("Attention"), "Softmax" in ops, graph.opset_import[0].version) == ((1, False, 23) if fused else (0, True, 17))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for rows in (1, 3):  # not the traced batch of 2
        inputs = {name: torch.randn(rows, *shape) for name, (shape, _) in spec.items()}
        with torch.no_grad():
            expected = module.double()(**{k: v.double() for k, v in inputs.items()}).numpy()
        got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    default = export_named(module.float(), spec, ("out",), tmp_path / "plain.onnx")
    assert "Softmax" in [node.op_type for node in onnx.load(str(default)).graph.node]  # torch's own, outside


def test_onnx_norm_head_broadcasts_or_pairs_uncond(tiny_sd1, tmp_path):
    model = load_model(tiny_sd1, device="cpu")
    engine = create_engine("onnx", model.family.denoiser_module(), cache_dir=tmp_path, cache_key="k")
    latents, text = torch.randn(5, 4, 8, 8), {"encoder_hidden_states": torch.randn(5, 77, 32)}
    t = torch.tensor(741)
    with torch.no_grad():
        noise = model.denoiser(latents, t, encoder_hidden_states=text["encoder_hidden_states"]).sample
    for uncond in (torch.randn(1, 4, 8, 8), torch.randn(5, 4, 8, 8)):
        expected = (noise - uncond).flatten(1).norm(dim=1)
        torch.testing.assert_close(engine.conditional_norm(latents, t, text, uncond), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(engine.predict(latents, t, text), noise, rtol=1e-4, atol=1e-5)


def test_onnx_export_is_cached_per_model(tiny_sd1, tmp_path):
    unet = load_model(tiny_sd1, device="cpu").family.denoiser_module()
    latents, t, text = torch.randn(2, 4, 8, 8), torch.tensor(981), {"encoder_hidden_states": torch.randn(2, 77, 32)}

    def export_files():
        return sorted((tmp_path / "onnx").glob(f"*/{MODEL_FILE}"))

    first = create_engine("onnx", unet, cache_dir=tmp_path, cache_key="model-a").predict(latents, t, text)
    [exported] = export_files()
    stamp = exported.stat().st_mtime_ns
    again = create_engine("onnx", unet, cache_dir=tmp_path, cache_key="model-a").predict(latents, t, text)
    assert export_files() == [exported] and exported.stat().st_mtime_ns == stamp  # reused, not re-exported
    torch.testing.assert_close(again, first)
    create_engine("onnx", unet, cache_dir=tmp_path, cache_key="model-b").predict(latents, t, text)
    assert len(export_files()) == 2
    assert not [p for p in (tmp_path / "onnx").iterdir() if p.name.count(".")]  # no staging folders left


def test_unknown_engine_and_missing_package_say_why(monkeypatch):
    with pytest.raises(EngineUnavailable, match="unknown engine 'nope'"):
        create_engine("nope", torch.nn.Linear(1, 1))
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)  # import now fails
    with pytest.raises(EngineUnavailable, match="pip install onnxruntime"):
        create_engine("onnx", torch.nn.Linear(1, 1))


def test_buckets_pad_with_the_last_row_and_cover_every_size():
    assert [bucket_for(n) for n in (1, 2, 3, 5, 64, 65, 128)] == [1, 2, 4, 8, 64, 128, 128]
    x = torch.randn(3, 2)
    padded = pad_rows(x, 4)
    assert padded.shape == (4, 2) and torch.equal(padded[:3], x) and torch.equal(padded[3], x[2])
    assert pad_rows(x, 3) is x


def test_in_buckets_cuts_pads_and_slices_back():
    seen = []

    def run(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(len(x))
        return x * 2, (x + y).sum(-1)

    x, y = torch.randn(7, 3), torch.randn(7, 3)
    doubled, sums = in_buckets(run, {"x": x, "y": y}, buckets=(1, 2, 4))
    assert seen == [4, 4] and torch.equal(doubled, x * 2) and torch.equal(sums, (x + y).sum(-1))  # 4 rows, then 3 padded to 4


@pytest.mark.slow  # torch.compile takes minutes per graph on 2 CPU cores
def test_compile_scores_match_torch(tiny_sd1, monkeypatch):
    """The denoiser and the text encoder are compiled, and score as eager does."""
    model = load_model(tiny_sd1, device="cpu")
    compiled, compile_ = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **options: compiled.append(module) or compile_(module, **options))
    _assert_same_scores(model, create_engine("compile", model.family.denoiser_module()))
    assert [getattr(m, "encoder", None) for m in compiled[1:]] == [model.family.text_encoders["text_encoder"]]


@pytest.mark.slow  # as above, one graph per family
def test_compile_scores_match_torch_on_every_family(family_path):
    model = load_model(family_path[1], device="cpu")
    _assert_same_scores(model, create_engine("compile", model.family.denoiser_module()))


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="tensorrt is not installed")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="tensorrt needs a CUDA device")
def test_tensorrt_scores_match_torch_fp16(tiny_sd1, tmp_path):
    model = load_model(tiny_sd1, device="cuda", dtype="fp16")
    engine = create_engine("tensorrt", model.family.denoiser_module(), cache_dir=tmp_path, cache_key=model.fingerprint)
    prompts = _prompts(np.random.default_rng(), 6)
    expected = Scanner(model, DetectSettings()).score(prompts).per_generation
    got = Scanner(model, DetectSettings(), engine=engine).score(prompts).per_generation
    np.testing.assert_allclose(got, expected, rtol=2e-2)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_tensorrt_without_tensorrt_says_why(tiny_sd1):
    with pytest.raises(EngineUnavailable, match="needs TensorRT"):
        create_engine("tensorrt", load_model(tiny_sd1, device="cpu").family.denoiser_module())


def test_every_engine_is_registered():
    assert set(ENGINES) == {"torch", "compile", "onnx", "tensorrt"}


def test_scan_command_with_the_onnx_engine_matches_torch(tiny_sd1, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from scanner.cli import main

    monkeypatch.setenv("MEMSCAN_CACHE", str(tmp_path / "cache"))
    inputs = tmp_path / "p.txt"
    inputs.write_text("\n".join(_prompts(np.random.default_rng(), 5)) + "\n")
    scores = {}
    for engine in ("torch", "onnx"):
        out = tmp_path / f"{engine}.parquet"
        # Reference noise: no scan plan serves it (tests/test_plan.py), so the onnx engine scores.
        assert main(["scan", str(inputs), "--model", str(tiny_sd1), "--out", str(out), "--engine", engine, "--batch-size", "2",
                     "--noise", "reference"]) == 0
        scores[engine] = pq.read_table(out).column("score").to_numpy()
    np.testing.assert_allclose(scores["onnx"], scores["torch"], rtol=1e-4)
    # Exported into the user's cache, the text encoder beside the denoiser under its own key.
    [denoiser] = (tmp_path / "cache" / "onnx").glob(f"*/{MODEL_FILE}")
    [text_encoder] = (tmp_path / "cache" / "onnx").glob(f"*/{TEXT_ENCODER_FILE}")
    fingerprint = load_model(tiny_sd1, device="cpu").fingerprint
    keys = [json.loads((path.parent / "settings.json").read_text())["cache_key"] for path in (denoiser, text_encoder)]
    assert keys == [fingerprint, f"{fingerprint}-text_encoder"]
