"""The commands on families other than SD 1.x/2.x (SDXL, SD3, Flux, PixArt): scan (formats, rejects, resume),
explain, calibrate, sweep, eval, the service, generate and (slow) Ray.

The family tests prove the scores; these prove that every job reaches them through the
adapter: the same numbers as `Scanner.score`, whatever the command.
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest

from scanner.cli import main
from scanner.detect import DetectSettings, Scanner
from scanner.families import FAMILIES
from scanner.model import load_model

FAMILY_NAMES = ("flux", "pixart", "sd3", "sdxl")  # tiny random pipelines (conftest `tiny_family`)
WORDS = ["a", "photo", "of", "red", "cat", "castle", "at", "night", "oil", "painting", "Portrait", "1914"]


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family_model(request, tiny_family):
    """A tiny random pipeline of each family, saved and loaded as a user's folder would be."""
    path = tiny_family(request.param)
    return request.param, path, load_model(path, device="cpu")


def _prompts(count: int) -> list[str]:
    rng = random.Random()
    return [" ".join(rng.choices(WORDS, k=rng.randint(1, 8))) + f" {i}" for i in range(count)]


def test_scan_formats_rejects_and_resume_go_through_the_family(family_model, tmp_path, capsys):
    name, path, model = family_model
    prompts = _prompts(5)
    (tmp_path / "a.txt").write_text("\n".join(prompts[:3]) + "\n")
    (tmp_path / "b.jsonl").write_text(
        "\n".join(json.dumps({"prompt": p}) for p in prompts[3:]) + '\n{"prompt": ""}\n{"other": 1}\n'
    )
    out = tmp_path / "scan.parquet"
    argv = ["scan", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), "--model", str(path), "--out", str(out),
            "--batch-size", "2", "--checkpoint-rows", "1"]
    assert main(argv) == 0
    rows = pq.read_table(out).to_pylist()
    expected = Scanner(model, DetectSettings()).score(prompts).score
    assert [r["prompt"] for r in rows] == prompts
    np.testing.assert_allclose([r["score"] for r in rows], expected, rtol=1e-5, err_msg=name)
    space = "model" if model.family.flow else "epsilon"
    assert {json.loads(r["settings"])["score_space"] for r in rows} == {space}
    rejects = [json.loads(line) for line in (tmp_path / "scan.rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 2
    assert main(argv) == 2  # the finished output is not written twice
    assert "already exists" in capsys.readouterr().err


def test_explain_and_calibrate_on_the_family(family_model, tmp_path, capsys):
    name, path, model = family_model
    prompt = _prompts(1)[0]
    assert main(["explain", prompt, "--model", str(path), "--format", "json"]) == 0
    explained = json.loads(capsys.readouterr().out)
    scanner = Scanner(model, DetectSettings())
    assert explained["score"] == pytest.approx(float(scanner.score([prompt]).score[0]), rel=1e-5), name
    assert "".join(w["word"] for w in explained["words"]) == "".join(prompt.split())  # every word, in order
    labels = tmp_path / "labels.jsonl"
    labelled = _prompts(6)
    labels.write_text("\n".join(json.dumps({"prompt": p, "label": i % 2}) for i, p in enumerate(labelled)) + "\n")
    out = tmp_path / "calibration.json"
    assert main(["calibrate", "--labels", str(labels), "--model", str(path), "--target-fpr", "0.5", "--out", str(out)]) == 0
    calibration = json.loads(out.read_text())
    assert calibration["model"] == model.fingerprint and calibration["n_pos"] == 3 and calibration["n_neg"] == 3
    assert calibration["settings"]["guidance_scale"] == model.family.default_guidance_scale, name
    scores = scanner.score(labelled).score
    assert min(scores) <= calibration["threshold"] <= max(scores)


def test_generate_command_on_the_family(family_model, tmp_path):
    """`memscan generate` runs the family's own pipeline from memscan's conditioning and writes the images."""
    from PIL import Image

    name, path, model = family_model
    out = tmp_path / "gen"
    assert main(["generate", "a red cat", "--model", str(path), "--seeds", "0,1", "--inference-steps", "2", "--out", str(out)]) == 0
    sizes = {Image.open(out / f"seed-{seed}.png").size for seed in (0, 1)}
    vae_factor = 2  # the tiny VAEs have two blocks
    assert sizes == {(model.latent_shape[2] * vae_factor, model.latent_shape[1] * vae_factor)}, name
    sidecar = json.loads(next(out.glob("*.json")).read_text())
    expected_scheduler = "FlowMatchEulerDiscreteScheduler" if model.family.flow else "DDIMScheduler"
    assert sidecar["settings"]["scheduler"] == expected_scheduler, name
    assert sidecar["settings"]["guidance_scale"] == model.family.default_guidance_scale, name  # none was given
    assert sidecar["score"] == pytest.approx(float(Scanner(model, DetectSettings()).score(["a red cat"]).score[0]), rel=1e-5)


@pytest.mark.parametrize("pipeline", sorted(FAMILIES))
def test_each_familys_default_guidance_scale_is_its_pipelines(pipeline):
    import diffusers

    module, cls_name = FAMILIES[pipeline]
    family = getattr(importlib.import_module(f"scanner.families.{module}"), cls_name)
    # Flux's classifier-free guidance is the true-CFG path's (its guidance_scale is the distilled embedding's input).
    parameter = "true_cfg_scale" if family.name == "flux" else "guidance_scale"
    default = inspect.signature(getattr(diffusers, pipeline).__call__).parameters[parameter].default
    assert family.default_guidance_scale == default


def test_guidance_scale_defaults_to_the_familys_and_an_explicit_one_wins(family_model, tmp_path):
    """Scored past the first step, the scan walks at the family's scale unless given one, and records the scale it used."""
    name, path, model = family_model
    default = model.family.default_guidance_scale
    explicit = default + random.choice([-1, 1]) * round(random.uniform(0.5, 2.5), 2)
    prompts = _prompts(2)
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    window = DetectSettings(num_inference_steps=3, end_step=2)
    scores = {}
    for scale, given in ((default, []), (explicit, ["--guidance-scale", str(explicit)])):
        out = tmp_path / f"{scale}.parquet"
        argv = ["scan", str(tmp_path / "p.txt"), "--model", str(path), "--out", str(out), "--inference-steps", "3", "--steps", "2"]
        assert main([*argv, *given]) == 0
        rows = pq.read_table(out).to_pylist()
        assert {json.loads(r["settings"])["guidance_scale"] for r in rows} == {scale}, name
        scores[scale] = [r["score"] for r in rows]
        expected = Scanner(model, replace(window, guidance_scale=scale)).score(prompts).score
        np.testing.assert_allclose(scores[scale], expected, rtol=1e-5, err_msg=f"{name} at {scale}")
    assert not np.allclose(scores[default], scores[explicit]), name  # the scale reaches the walked step


# By default on one flow family (SD3) and one diffusion family (PixArt): these commands reach the adapter only
# through `Scanner` and `explain`, as scan does, whose cases above run on every family. Flux (its 4,096 image
# tokens at the default resolution) and SDXL are in the slow set.
@pytest.mark.parametrize(
    "family_model", [pytest.param(n, marks=[pytest.mark.slow] if n in ("flux", "sdxl") else []) for n in FAMILY_NAMES],
    indirect=True, scope="module",
)
def test_sweep_eval_and_the_service_on_the_family(family_model, tmp_path, capsys):
    from fastapi.testclient import TestClient
    from sklearn.metrics import roc_auc_score

    from scanner.explain import explain
    from scanner.service import create_app

    name, path, model = family_model
    scanner = Scanner(model, DetectSettings())
    prompts = _prompts(6)
    expected = scanner.score(prompts).score
    # sweep: every prompt new, its report's top prompts ranked by the family's own scores.
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    argv = ["sweep", str(tmp_path / "p.txt"), "--model", str(path), "--store", str(tmp_path / "s.db"),
            "--report", str(tmp_path / "r"), "--top", "3", "--no-calibration"]
    assert main(argv) == 0 and "6 new" in capsys.readouterr().out
    (summary,) = (tmp_path / "r").glob("sweep-1-*.json")
    top = json.loads(summary.read_text())["top"]
    order = np.argsort(-expected, kind="stable")[:3]
    assert [entry["prompt"] for entry in top] == [prompts[i] for i in order], name
    np.testing.assert_allclose([entry["score"] for entry in top], expected[order], rtol=1e-5, err_msg=name)
    # eval: the AUC sklearn gives on the family's scores.
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"prompt": p, "label": i % 2}) + "\n" for i, p in enumerate(prompts)))
    assert main(["eval", "--labels", str(labels), "--model", str(path), "--json", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["auc"] == pytest.approx(roc_auc_score([i % 2 for i in range(6)], expected), abs=1e-9), name
    # the service: scores and both explanations as the library gives them.
    with TestClient(create_app(Scanner(model, DetectSettings()))) as client:
        body = client.post("/v1/score", json={"prompts": prompts}).json()
        np.testing.assert_allclose([r["score"] for r in body["results"]], expected, rtol=1e-5, err_msg=name)
        for method in ("grad", "ablation"):
            words = client.post("/v1/explain", json={"prompt": prompts[0], "method": method}).json()["words"]
            (reference,) = explain(scanner, [prompts[0]], method, None)
            assert [w["score"] for w in words] == pytest.approx([w.score for w in reference.words], rel=1e-4, abs=1e-6)


@pytest.mark.slow  # a local Ray and a worker per family
def test_ray_scan_on_the_family(family_model, tmp_path):
    pytest.importorskip("ray")
    name, path, model = family_model
    prompts = _prompts(5)
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "ray.jsonl"
    argv = ["scan", str(tmp_path / "p.txt"), "--model", str(path), "--out", str(out), "--engine", "ray", "--workers", "1",
            "--batch-size", "2", "--no-calibration"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected = Scanner(model, DetectSettings()).score(prompts).score
    np.testing.assert_allclose([r["score"] for r in rows], expected, rtol=1e-5, err_msg=name)
