"""Scan plans (`scanner.plan`): the first-step score as one ONNX graph, scored without torch, rebuilt when the model changes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import onnx
import pytest

from scanner.cli import build_parser, main
from scanner.cli.scan import plan_refusal
from scanner.detect import DetectSettings, Scanner
from scanner.model import load_model
from scanner.plan import GRAPH_FILE, PlanRequest, PlanScanner, ScanPlan, build_plan, family_refusal

pytest.importorskip("onnxruntime")

WORDS = "a photo of the cat dog city night red blue painting portrait by artist in style oil canvas".split()


def _prompts(rng: np.random.Generator, count: int) -> list[str]:
    """Random prompts, some past CLIP's 77 tokens (truncated), one repeated."""
    prompts = [" ".join(rng.choice(WORDS, size=rng.integers(1, 12))) + f" {i}" for i in range(count)]
    prompts[1] = " ".join(rng.choice(WORDS, size=90))
    return prompts + prompts[:1]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMSCAN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _assert_plan_matches_scanner(path, settings: DetectSettings) -> list[bool]:
    """The plan's scores of random prompts against the torch scanner's; the prompts' truncation flags."""
    model = load_model(path, device="cpu")
    plan = build_plan(model, PlanRequest(path, settings))
    ops = {node.op_type for node in onnx.load(str(plan.folder / GRAPH_FILE)).graph.node}
    assert plan.manifest["fused_attention"] and "Attention" in ops and "Softmax" not in ops  # every attention fused
    planned, scanner = PlanScanner(plan, threads=int(np.random.default_rng().integers(1, 4))), Scanner(model, settings)
    rng = np.random.default_rng()
    prompts = _prompts(rng, int(rng.integers(3, 12)))  # batch sizes other than the export's 2
    got, expected = planned.score(prompts), scanner.score(prompts)
    assert got.per_generation.shape == expected.per_generation.shape == (len(prompts), settings.generations)
    # One fp32 function computed twice (ONNX Runtime's kernels against torch's): rounding apart.
    np.testing.assert_allclose(got.per_generation, expected.per_generation, rtol=1e-5, atol=1e-6)
    assert (got.n_tokens, got.truncated) == (expected.n_tokens, expected.truncated)
    assert planned.settings == scanner.settings
    return got.truncated


@pytest.mark.parametrize("generations", [1, 3])
@pytest.mark.parametrize("variant", ["sd1", "sd2"])  # sd2: v-prediction, scores scaled into epsilon space
def test_plan_scores_match_the_scanner(variant, generations, tiny_sd1, tiny_sd2, cache):
    truncated = _assert_plan_matches_scanner({"sd1": tiny_sd1, "sd2": tiny_sd2}[variant], DetectSettings(generations=generations, seed=7))
    assert any(truncated)  # CLIP's 77 tokens: the long prompt is cut where the pipeline cuts it


@pytest.mark.parametrize(("family", "options"), [("sdxl", {}), ("sd3", {}), ("sd3", {"with_t5": False}), ("flux", {})])
def test_plan_scores_match_the_scanner_on_every_family(family, options, tiny_family, cache):
    """Two or three tokenizers and text encoders, pooled embeddings, SD3's zeros for a missing T5, flow models' velocity:
    all inside one graph, at batch sizes other than the export's."""
    _assert_plan_matches_scanner(tiny_family(family, **options), DetectSettings())


def test_a_family_that_rewrites_prompts_is_not_planned(tiny_family):
    assert "rewrites prompts" in family_refusal(load_model(tiny_family("pixart"), device="cpu").family)


def test_a_changed_model_index_keys_a_new_plan_and_the_old_one_goes(tiny_sd1, tmp_path, cache):
    """`model_index.json` holds pipeline options the plan's constants depend on (SDXL's force_zeros_for_empty_prompt)."""
    model = tmp_path / "model"
    subprocess.run(["cp", "-r", str(tiny_sd1), str(model)], check=True)
    request = PlanRequest(model, DetectSettings())
    first = build_plan(load_model(model, device="cpu"), request)
    index = model / "model_index.json"
    os.utime(index, ns=(index.stat().st_atime_ns, index.stat().st_mtime_ns + 10**9))
    assert ScanPlan.find(request) is None
    second = build_plan(load_model(model, device="cpu"), request)
    assert second.folder != first.folder and not first.folder.exists() and ScanPlan.find(request) == second


def test_a_new_plan_format_discards_the_plans_of_older_ones(tiny_sd1, cache, monkeypatch):
    from scanner import plan as plans

    request, model = PlanRequest(tiny_sd1, DetectSettings()), load_model(tiny_sd1, device="cpu")
    with monkeypatch.context() as older:
        older.setattr(plans, "PLAN_FORMAT", plans.PLAN_FORMAT - 1)
        old = build_plan(model, request)
    new = build_plan(model, request)
    assert new.folder != old.folder and not old.folder.exists() and [p.name for p in new.folder.parent.iterdir()] == [new.folder.name]


def test_a_plan_names_the_model_as_the_scan_does(tmp_path, cache, monkeypatch, capsys):
    """Built with a relative --model from one folder, used with an absolute one from another: the model folder's
    own calibration is found (the bundled testbed's, made with the torch engine, applies to the plan's scores)."""
    from scanner.testbed import default_model_path

    testbed = default_model_path()
    inputs = tmp_path / "p.txt"
    inputs.write_text("a red fox\nthe city at night\n")
    flagged = []
    for run, (cwd, name) in enumerate([(testbed.parent, testbed.name), (tmp_path, str(testbed))]):
        monkeypatch.chdir(cwd)
        out = tmp_path / f"s{run}.jsonl"
        assert main(["scan", str(inputs), "--model", name, "--out", str(out)]) == 0
        flagged.append([json.loads(line)["flagged"] for line in out.read_text().splitlines()])
        assert ("compiling the scan plan" in capsys.readouterr().err) == (run == 0)
    assert flagged[0] == flagged[1] and None not in flagged[1]


def _held_runs(planned: PlanScanner) -> tuple[list[int], threading.Event]:
    """Make `planned`'s runs wait for the returned event, noting each run's rows as it starts."""
    started, release = [], threading.Event()
    run = planned.engine._run

    def held(feed):
        started.append(len(next(iter(feed.values()))))
        release.wait(10)
        return run(feed)

    planned.engine._run = held
    return started, release


def _wait_for(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_plan_runs_chunks_side_by_side_on_the_thread_count(tiny_sd1, cache):
    """Single-threaded runs, `threads` of them at once, score a batch as one run does (an empty one too)."""
    plan = build_plan(load_model(tiny_sd1, device="cpu"), PlanRequest(tiny_sd1, DetectSettings()))
    prompts = _prompts(np.random.default_rng(), 13)
    expected = PlanScanner(plan, threads=1, cache_size=0).score(prompts).per_generation
    for threads, chunk_rows in ((3, 64), (2, 4)):
        planned = PlanScanner(plan, threads=threads, cache_size=0)
        planned.engine.chunk_rows = chunk_rows
        started, release = _held_runs(planned)
        pending = planned.submit(prompts)
        assert _wait_for(lambda: len(started) == threads)  # as many runs at once as threads, none more
        time.sleep(0.05)
        assert len(started) == threads
        release.set()
        np.testing.assert_allclose(pending.result().per_generation, expected, rtol=1e-6)
    assert planned.engine.scores(planned.family.tokenize([])).shape == (0, 1)


def test_a_batch_that_failed_is_not_served_from_the_prompt_cache(tiny_sd1, cache):
    plan = build_plan(load_model(tiny_sd1, device="cpu"), PlanRequest(tiny_sd1, DetectSettings()))
    planned = PlanScanner(plan, threads=2)
    prompts = _prompts(np.random.default_rng(), 6)
    run = planned.engine._run

    def failing(feed):
        raise RuntimeError("a run that failed")

    planned.engine._run = failing
    with pytest.raises(RuntimeError, match="a run that failed"):
        planned.score(prompts)
    planned.engine._run = run
    expected = PlanScanner(plan, threads=1, cache_size=0).score(prompts).per_generation
    np.testing.assert_allclose(planned.score(prompts).per_generation, expected, rtol=1e-6)


def test_larger_latents_run_one_batch_at_a_time_on_every_thread(tiny_sd1, cache, monkeypatch):
    """Where a chunk would hold fewer than SIDE_BY_SIDE_ROWS rows, side-by-side runs are not what was measured."""
    from scanner import plan as plans

    plan = build_plan(load_model(tiny_sd1, device="cpu"), PlanRequest(tiny_sd1, DetectSettings()))
    monkeypatch.setattr(plans, "RUN_LATENT_ELEMENTS", 256 * (plans.SIDE_BY_SIDE_ROWS - 1))  # tiny SD1: 4 x 8 x 8
    planned = PlanScanner(plan, threads=3)
    assert planned.engine.runs == 1 and planned.engine.session.get_session_options().intra_op_num_threads == 3


def test_closing_a_plan_scanner_drops_the_runs_not_started(tiny_sd1, cache):
    """What a scan stopped by Ctrl-C does: the batch behind the one running is not computed before the process ends."""
    from concurrent.futures import CancelledError

    plan = build_plan(load_model(tiny_sd1, device="cpu"), PlanRequest(tiny_sd1, DetectSettings()))
    planned = PlanScanner(plan, threads=1, cache_size=0)
    planned.engine.chunk_rows = 1
    started, release = _held_runs(planned)
    pending = planned.submit(_prompts(np.random.default_rng(), 4))
    assert _wait_for(lambda: started)
    planned.close()
    release.set()
    with pytest.raises(CancelledError):
        pending.result()
    assert len(started) == 1  # the running chunk finished; the other three never started


@pytest.mark.parametrize("fault", ["wrong scale", "converter fails"])
def test_a_fused_graph_that_fails_or_disagrees_is_built_again_unfused(tiny_sd1, cache, monkeypatch, fault):
    from onnx.shape_inference import InferenceError

    from scanner.engines import onnx_export

    def faulty(path):
        if fault == "converter fails":  # onnx's own exception type, not a RuntimeError
            raise InferenceError("[ShapeInferenceError] as an older onnx's converter raised")
        real_standard_attention(path)
        graph = onnx.load(str(path))
        for node in graph.graph.node:
            if node.op_type == "Attention":  # a valid graph that computes something else: only the check can tell
                kept = [a for a in node.attribute if a.name != "scale"]
                del node.attribute[:]
                node.attribute.extend([*kept, onnx.helper.make_attribute("scale", 0.5)])
        onnx.save(graph, str(path))

    real_standard_attention = onnx_export.standard_attention
    monkeypatch.setattr(onnx_export, "standard_attention", faulty)
    model = load_model(tiny_sd1, device="cpu")
    plan = build_plan(model, PlanRequest(tiny_sd1, DetectSettings()))
    reason = {"wrong scale": "differ from the model's", "converter fails": "InferenceError"}[fault]
    assert not plan.manifest["fused_attention"] and reason in plan.manifest["unfused_because"]
    assert "Softmax" in {node.op_type for node in onnx.load(str(plan.folder / GRAPH_FILE)).graph.node}
    prompts = _prompts(np.random.default_rng(), 5)
    np.testing.assert_allclose(PlanScanner(plan).score(prompts).per_generation,
                               Scanner(model, DetectSettings()).score(prompts).per_generation, rtol=1e-5, atol=1e-6)


def _scan(argv: list[str]) -> subprocess.CompletedProcess:
    """`memscan scan` in a fresh process that prints, last, which of torch, diffusers and transformers it imported."""
    code = (
        "import sys\nfrom scanner.cli import main\ncode = main(sys.argv[1:])\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\nsys.exit(code)"
    )
    return subprocess.run([sys.executable, "-c", code, "scan", *argv], capture_output=True, text=True, env=os.environ)


def test_a_scan_served_by_its_plan_imports_no_torch_and_a_changed_model_or_damaged_plan_rebuilds_it(tiny_sd1, tmp_path, cache):
    model = tmp_path / "model"
    subprocess.run(["cp", "-r", str(tiny_sd1), str(model)], check=True)
    inputs = tmp_path / "p.txt"
    inputs.write_text("\n".join(_prompts(np.random.default_rng(), 9)) + "\n")
    rows, imported, compiled = [], [], []
    for run in range(4):
        if run == 2:  # a weight file rewritten (its mtime moves): the plan no longer describes the model
            weights = next((model / "unet").glob("*.safetensors"))
            os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
        if run == 3:  # the plan's graph damaged (cut in half): it cannot be read, and is compiled again
            [graph] = (cache / "plans").glob("*/scorer.onnx")
            graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
        out = tmp_path / f"s{run}.jsonl"
        done = _scan([str(inputs), "--model", str(model), "--out", str(out), "--device", "cpu"])
        assert done.returncode == 0, done.stderr
        imported.append(done.stdout.splitlines()[-1])
        compiled.append("memscan: compiling the scan plan" in done.stderr)
        rows.append([json.loads(line) for line in out.read_text().splitlines()])
    assert compiled == [True, False, True, True]
    assert len(list((cache / "plans").glob("*/plan.json"))) == 1  # the plan of the old files discarded
    assert imported[1] == "[]" and imported[0] == imported[2] == imported[3] == "['diffusers', 'torch', 'transformers']"
    assert rows[0] == rows[1] == rows[2] == rows[3] and json.loads(rows[0][0]["settings"])["engine"] == "onnx"
    # The plan's scores are the torch scanner's, to rounding.
    scanner = Scanner(load_model(model, device="cpu"), DetectSettings())
    expected = scanner.score([r["prompt"] for r in rows[0]]).score
    np.testing.assert_allclose([r["score"] for r in rows[0]], expected, rtol=1e-5, atol=1e-6)
    assert [r["flagged"] for r in rows[0]] == [None] * len(rows[0])  # a random model: no calibration of its own


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        (["--engine", "torch"], "--engine torch"),
        (["--detector", "anisotropy"], "--detector anisotropy"),
        (["--steps", "2"], "first step only"),
        (["--noise", "reference"], "shared noise only"),
        (["--device", "cuda"], "on the CPU"),
        (["--dtype", "bf16"], "in fp32"),
        (["--dtype", "float32"], "--dtype float32"),  # not a --dtype name: the load refuses it, plan or none
        ([], None),
        (["--engine", "onnx", "--generations", "4", "--seed", "3", "--device", "cpu"], None),
    ],
)
def test_which_options_a_plan_serves(options, reason):
    args = build_parser().parse_args(["scan", "p.txt", "--out", "o.jsonl", *options])
    refusal = plan_refusal(args)
    assert refusal is None if reason is None else reason in refusal


@pytest.mark.parametrize(("nodes", "device"), [([], "cpu"), (["null", "tty0"], "cpu"), (["nvidia0"], "auto"),
                                               (["kfd"], "auto"), (["dxg"], "auto")])
def test_device_auto_is_the_cpu_only_where_no_gpu_node_exists(tmp_path, nodes, device):
    from scanner.plan import auto_device

    for node in nodes:
        (tmp_path / node).touch()
    assert auto_device(tmp_path) == device


def test_a_scan_no_plan_serves_runs_the_torch_scanner(tiny_sd1, tmp_path, cache):
    inputs = tmp_path / "p.txt"
    inputs.write_text("a red fox\nthe city at night\n")
    out = tmp_path / "s.jsonl"
    assert main(["scan", str(inputs), "--model", str(tiny_sd1), "--out", str(out), "--noise", "reference"]) == 0
    assert {json.loads(json.loads(line)["settings"])["engine"] for line in out.read_text().splitlines()} == {"torch"}
    assert not (cache / "plans").exists()


def test_an_unknown_engine_is_refused_before_the_load_naming_auto(tmp_path, capsys):
    from cli_output import LOADING

    inputs = tmp_path / "p.txt"
    inputs.write_text("a cat\n")
    assert main(["scan", str(inputs), "--out", str(tmp_path / "s.jsonl"), "--engine", "fast"]) == 2
    err = capsys.readouterr().err
    assert "memscan: error: unknown engine 'fast' (available: auto, torch," in err and LOADING not in err
