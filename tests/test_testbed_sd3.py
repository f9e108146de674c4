"""The SD 3 testbed (`memscan testbed build --family sd3`): smoke builds, its exact attention shortcut, and the bundle."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from test_family_sd3 import TinySD3
from tiny_families import one_thread  # noqa: F401 (an autouse fixture)
from tiny_families_flow import check_parity

from scanner.model import load_model
from scanner.testbed import default_labels_path, default_model_path
from scanner.testbed.build import FLOW_SMOKE_CONFIG, SMOKE_CONFIG, build_testbed, load_build_data, make_data
from scanner.testbed.groundtruth import Sampler, generate, load_pipeline
from scanner.testbed.recipes import T5_ZERO_TOKENS, FlowRecipe, RepeatedContextAttnProcessor

SEED = random.randrange(2**31)  # fresh latents each run, shown in the messages
PROMPTS = ["a red circle at the top left", "Shaw Floors Value Collections", "x", "a red circle at the top left"]


@pytest.fixture(scope="module")
def smoke_builds(tmp_path_factory):
    """Two sd3 smoke builds with the same seed: (their stats, their folders)."""
    folders = [tmp_path_factory.mktemp("smoke-sd3") for _ in range(2)]
    return [build_testbed(folder, seed=5, cfg=FLOW_SMOKE_CONFIG) for folder in folders], folders


def _plain_pipeline(folder):
    from diffusers import StableDiffusion3Pipeline

    # diffusers loads SD 3 without T5 only when told so (its documented way to drop T5).
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sd3_smoke_build_loads_in_diffusers(smoke_builds):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    _, (folder, _) = smoke_builds
    pipe = _plain_pipeline(folder)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 3.0
    assert isinstance(pipe.transformer, SD3Transformer2DModel) and pipe.text_encoder_3 is None
    assert all(isinstance(e, CLIPTextModelWithProjection) for e in (pipe.text_encoder, pipe.text_encoder_2))
    assert (pipe.tokenizer.pad_token, pipe.tokenizer_2.pad_token) == ("<|endoftext|>", "!")
    image = pipe("a red circle", num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 16, 16)


def test_sd3_smoke_build_is_deterministic(smoke_builds):
    stats, folders = smoke_builds
    weights = [sorted(f.rglob("*.safetensors")) for f in folders]
    assert len(weights[0]) == 4  # two text encoders, the transformer, the VAE
    assert [p.relative_to(folders[0]) for p in weights[0]] == [p.relative_to(folders[1]) for p in weights[1]]
    for a, b in zip(*weights):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert (folders[0] / "eval_prompts.jsonl").read_text() == (folders[1] / "eval_prompts.jsonl").read_text()
    assert stats[0]["groundtruth"] == stats[1]["groundtruth"]
    assert stats[0]["groundtruth"]["sampler"] == "flow matching Euler, 28 steps, guidance 7.0"
    assert stats[0]["config"]["family"] == "sd3"


def test_sd3_smoke_build_has_the_sd_builds_data(smoke_builds):
    """One world for both families: the sd3 build's data are what the sd recipe's smoke config makes with its seed."""
    from transformers import CLIPTokenizer

    _, (folder, _) = smoke_builds
    data = load_build_data(folder)
    sd = make_data(SMOKE_CONFIG, np.random.default_rng(5), CLIPTokenizer.from_pretrained(folder / "tokenizer"))
    assert data.eval_prompts == sd.eval_prompts and data.captions == sd.captions
    np.testing.assert_array_equal(data.images, sd.images)
    np.testing.assert_array_equal(data.repeats, sd.repeats)


def test_memscan_scores_the_sd3_smoke_build_as_its_pipeline_does(smoke_builds):
    """First step and a 2-step window, 2 generations: the scanner's scores are the pipeline's own velocity norms."""
    _, (folder, _) = smoke_builds
    model = load_model(folder, device="cpu")
    assert model.family.name == "sd3"
    tiny = TinySD3(model, _plain_pipeline(folder), SEED, 7.0, "sd3 smoke testbed")
    for window, generations in (((0, 1), 1), ((0, 2), 2)):
        check_parity(tiny, window, generations, [3], PROMPTS)


def test_repeated_context_attention_is_the_pipelines_attention(smoke_builds):
    """Training's 78-token context (the zero T5 states as one token counted 256 times) gives the transformer's
    output on the pipeline's 333 tokens, at every timestep, with weights away from their initialization."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    _, (folder, _) = smoke_builds
    transformer = _plain_pipeline(folder).transformer
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for p in transformer.parameters():
            p += 0.1 * torch.randn(p.shape, generator=generator)
        x = torch.randn((3, 4, 8, 8), generator=generator)
        clip = torch.randn((3, 77, transformer.config.joint_attention_dim), generator=generator)
        pooled = torch.randn((3, transformer.config.pooled_projection_dim), generator=generator)
        t = torch.tensor([1000.0, 517.0, 3.0])
        zeros = clip.new_zeros(3, T5_ZERO_TOKENS, clip.shape[-1])
        full = transformer(hidden_states=x, timestep=t, encoder_hidden_states=torch.cat([clip, zeros], 1),
                           pooled_projections=pooled).sample
        transformer.set_attn_processor(RepeatedContextAttnProcessor(T5_ZERO_TOKENS))
        short = transformer(hidden_states=x, timestep=t, encoder_hidden_states=torch.cat([clip, zeros[:, :1]], 1),
                            pooled_projections=pooled).sample
        transformer.set_attn_processor(JointAttnProcessor2_0())
        plain_short = transformer(hidden_states=x, timestep=t, encoder_hidden_states=torch.cat([clip, zeros[:, :1]], 1),
                                  pooled_projections=pooled).sample
    np.testing.assert_allclose(short.numpy(), full.numpy(), rtol=1e-4, atol=1e-5 * full.abs().max().item())
    assert (plain_short - full).abs().max() > 1e-3 * full.abs().max()  # the count matters: one plain zero token is not it


def test_the_ground_truths_generation_is_the_plain_pipelines(smoke_builds):
    """The ground truth's faster pipeline (repeated-context attention, max_sequence_length 1) generates the
    plain StableDiffusion3Pipeline's images (256 zero T5 states), seed by seed."""
    _, (folder, _) = smoke_builds
    sampler = FlowRecipe.sampler
    fast = generate(FlowRecipe.generation_pipeline(folder), PROMPTS[:3], 2, sampler)
    plain = generate(load_pipeline(folder), PROMPTS[:3], 2, Sampler(sampler.name, sampler.steps, sampler.guidance))
    assert fast.shape == (3, 2, 3, 16, 16)
    np.testing.assert_allclose(fast, plain, atol=1e-5)


def test_testbed_build_command_takes_the_family(tmp_path, capsys):
    from scanner.cli import main

    out = tmp_path / "tb"
    assert main(["testbed", "build", "--family", "sd3", "--out", str(out), "--seed", "1", "--smoke"]) == 0
    stats = json.loads((out / "testbed_stats.json").read_text())
    assert stats["command"] == f"memscan testbed build --family sd3 --out {out} --seed 1 --smoke"
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    assert "planted reproduced" in capsys.readouterr().out


CALIBRATE = ("memscan calibrate --model scanner/data/testbed_sd3 --labels scanner/data/testbed_sd3/eval_prompts.jsonl "
             "--target-fpr 0.01 --out scanner/data/testbed_sd3/calibration.json")
bundled = pytest.mark.skipif(not (default_model_path("sd3") / "model_index.json").exists(), reason="no bundled sd3 testbed")


@bundled
def test_the_bundled_sd3_testbed_fits_and_records_its_ground_truth():
    data = default_model_path().parent
    assert sum(p.stat().st_size for p in data.rglob("*") if p.is_file()) <= 30 * 2**20  # both bundles together
    stats = json.loads((default_model_path("sd3") / "testbed_stats.json").read_text())
    rows = [json.loads(line) for line in default_labels_path("sd3").read_text().splitlines()]
    counts = {kind: sum(row["kind"] == kind for row in rows) for kind in dict.fromkeys(row["kind"] for row in rows)}
    assert {kind: entry["n"] for kind, entry in stats["groundtruth"]["per_kind"].items()} == counts
    assert stats["config"]["family"] == "sd3"


@bundled
def test_the_bundled_sd3_testbed_calibration_is_for_the_bundled_model():
    from test_calibration import check_shipped_calibration

    rows = [json.loads(line) for line in default_labels_path("sd3").read_text().splitlines()]
    check_shipped_calibration(default_model_path("sd3"), rows, CALIBRATE)


def test_demo_takes_a_testbed_folder(smoke_builds, tmp_path, capsys):
    from scanner.cli import main

    _, (folder, _) = smoke_builds
    assert main(["demo", "--model", str(folder), "--out", str(tmp_path)]) == 0
    scored = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    labelled = [json.loads(line) for line in (folder / "eval_prompts.jsonl").read_text().splitlines()]
    assert [(row["prompt"], row["label"]) for row in scored] == [(row["prompt"], row["label"]) for row in labelled]
    assert f"prompts with {folder} in" in capsys.readouterr().out
