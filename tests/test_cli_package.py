"""The `memscan` command as a whole: help without torch, one meaning per option name, each command's exit
codes, every output and option checked before the model loads, and the loading line on stderr."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from cli_output import LOADING, one_line_error

from scanner.cli import EXIT_USAGE, build_parser, main
from scanner.errors import MemscanError
from scanner.testbed import default_labels_path

REPO = Path(__file__).resolve().parents[1]


def _leaf_commands() -> dict[str, object]:
    """Every runnable subcommand's parser by its name ("scan", "testbed build", ...)."""
    pending, leaves = [("", build_parser())], {}
    while pending:
        name, parser = pending.pop()
        subparsers = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        if not subparsers and name:
            leaves[name] = parser
        for action in subparsers:
            pending += [(f"{name} {sub}".strip(), child) for sub, child in action.choices.items()]
    return leaves


def test_help_and_version_do_not_import_torch():
    code = (
        "import sys\n"
        "from scanner.cli import main\n"
        "for argv in (['--help'], ['--version'], ['scan', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "memscan 0." in proc.stdout and proc.stdout.strip().splitlines()[-1] == "False"


def test_names_spelled_out_for_help_match_the_library():
    from scanner.cli.common import DETECTOR_NAMES, ENGINE_NAMES
    from scanner.cli.generation import METHOD_NAMES
    from scanner.detectors import DETECTORS
    from scanner.engines import ENGINES
    from scanner.mitigate import METHODS

    assert ENGINE_NAMES == tuple(ENGINES) and METHOD_NAMES == METHODS and DETECTOR_NAMES == tuple(DETECTORS)


def test_each_command_lists_only_the_exit_codes_it_can_return():
    leaves = _leaf_commands()
    assert {"scan", "sweep", "generate", "testbed build", "demo", "eval-mitigation"} <= set(leaves)
    for name, parser in leaves.items():
        epilog = parser.format_help().split("exit codes:")[1]
        codes = re.findall(r"^  (\d+) ", epilog, flags=re.M)
        assert codes == (["0", "1", "2", "3", "130"] if name in ("scan", "sweep") else ["0", "1", "2", "130"]), name
        assert ("resume" in epilog) == (name in ("scan", "sweep")), name


def test_option_names_mean_one_thing():
    helps: dict[str, set[str]] = {}
    for name, parser in _leaf_commands().items():
        for action in parser._actions:
            for option in action.option_strings:
                helps.setdefault(option, set()).add(action.help)
        assert "--guidance" not in parser._option_string_actions, name
    # --steps is the scored window wherever it is offered; the trajectory is --inference-steps.
    for option in ("--steps", "--inference-steps", "--guidance-scale", "--detector"):
        assert len(helps[option]) == 1, (option, helps[option])
    # --json always names a file to write; a command that prints JSON says --format json.
    for name, parser in _leaf_commands().items():
        actions = parser._option_string_actions
        if "--json" in actions:
            assert actions["--json"].nargs is None and actions["--json"].const is None, name
        if "--format" in actions:
            assert actions["--format"].choices == ("text", "json"), name
    assert {"explain", "mitigate"} <= {name for name, p in _leaf_commands().items() if "--format" in p._option_string_actions}
    assert "score sampling steps" in helps["--steps"].pop()
    # --detector scores scan, sweep, calibrate and eval alike, from the same names.
    from scanner.cli.common import DETECTOR_NAMES

    detecting = {name for name, p in _leaf_commands().items() if "--detector" in p._option_string_actions}
    assert {"scan", "sweep", "calibrate", "eval"} <= detecting
    for name in detecting:
        action = _leaf_commands()[name]._option_string_actions["--detector"]
        assert tuple(action.choices) == DETECTOR_NAMES and action.default == "wen", name
    generate = _leaf_commands()["generate"]._option_string_actions
    assert "--steps" not in generate and {"--inference-steps", "--guidance-scale"} <= set(generate)


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """Record (and stop) every way a command loads a model."""
    import scanner.detect
    import scanner.model

    calls: list[str] = []

    def load(*args, **kwargs):
        calls.append("load")
        raise AssertionError("the model was loaded before the options were checked")

    for module, name in ((scanner.detect.ScannerSpec, "load"), (scanner.model, "load_model"), (scanner.detect, "load_model")):
        monkeypatch.setattr(module, name, load)
    return calls


def test_outputs_and_options_are_checked_before_the_model_loads(tmp_path, tiny_sd1, capsys, loads):
    model = ["--model", str(tiny_sd1), "--device", "cpu"]
    inp = tmp_path / "p.txt"
    inp.write_text("a cat\n")
    a_file, a_folder, existing = tmp_path / "a-file", tmp_path / "a-folder.jsonl", tmp_path / "done.jsonl"
    a_file.write_text("")
    a_folder.mkdir()
    existing.write_text("{}\n")
    unwritable = Path("/proc/memscan-out")  # refuses new files even to root
    cases = [
        (["scan", str(inp), *model, "--out", str(tmp_path / "o.csv")], "must end in"),
        (["scan", str(inp), *model, "--out", str(existing)], "already exists"),
        (["scan", str(inp), *model, "--out", str(a_folder)], "is a folder"),
        (["scan", str(inp), *model, "--out", str(tmp_path / "no" / "o.jsonl")], "does not exist"),
        (["scan", str(inp), *model, "--out", f"{unwritable}.jsonl"], "cannot write"),
        (["scan", str(inp), "--model", str(tiny_sd1), "--device", "tpu", "--out", str(tmp_path / "o.jsonl")], "unknown device"),
        (["calibrate", "--labels", str(default_labels_path()), *model, "--out", str(a_folder)], "is a folder"),
        (["calibrate", "--labels", str(default_labels_path()), *model, "--out", f"{unwritable}.json"], "cannot write"),
        (["eval", *model, "--json", str(a_file / "m.json")], "cannot write"),
        (["demo", "--out", str(a_file)], "not a folder"),
        (["demo", "--out", str(unwritable)], "cannot write"),
        (["generate", "a cat", *model, "--out", str(a_file)], "not a folder"),
        (["generate", "a cat", *model, "--out", str(a_file / "sub")], "cannot write"),
        (["generate", "a cat", *model, "--out", str(unwritable)], "cannot write"),
        (["generate", "a cat", *model, "--out", str(tmp_path / "g"), "--inference-steps", "0"], "--inference-steps"),
        (["mitigate", "a cat", *model, "--out", str(unwritable), "--target", "0"], "cannot write"),
        (["mitigate", "a cat", *model, "--out", str(tmp_path / "m"), "--lr", "0", "--target", "0"], "--lr"),
        (["mitigate", "a cat", *model, "--out", str(tmp_path / "m"), "--calibration", str(a_file)], "calibration"),
        (["mitigate", "a cat", *model, "--out", str(tmp_path / "m")], "needs a target"),
        (["explain", *model], "no prompts"),
        (["explain", "a cat", *model, "--calibration", str(tmp_path / "missing.json")], "missing.json"),
        (["sweep", str(inp), *model, "--store", str(tmp_path / "s.db"), "--report", str(a_file)], "report folder"),
        (["serve", *model, "--port", "70000"], "--port"),
        (["bench", *model, "--json", str(a_folder)], "not a file"),
        (["scan", str(inp), *model, "--out", str(tmp_path / "t.jsonl"), "--threads", "0"], "--threads must be >= 1"),
        (["bench", "--sd15", "--threads", "0"], "--threads must be >= 1"),
        (["bench", "--sd15", "--device", "cpu"], "--sd15 is for GPUs"),
        (["eval-mitigation", *model, "--json", str(unwritable / "r.json")], "cannot write"),
        (["scan", str(inp), *model, "--out", str(tmp_path / "t.jsonl"), "--detector", "sail", "--engine", "onnx"],
         "--detector sail needs --engine torch: it takes forward-mode derivatives"),
        (["calibrate", "--labels", str(default_labels_path()), *model, "--out", str(tmp_path / "c.json"),
          "--detector", "attention-entropy", "--engine", "compile"], "--detector attention-entropy needs --engine torch"),
        (["eval", *model, "--json", str(tmp_path / "e.json"), "--detector", "sail", "--engine", "onnx"],
         "--detector sail needs --engine torch"),
        (["scan", str(inp), *model, "--out", str(tmp_path / "t.jsonl"), "--detector", "anisotropy", "--engine", "ray"],
         "Ray workers score with wen only"),
    ]
    for argv, message in cases:
        err = one_line_error(capsys, main(argv))
        assert message in err, (argv, err)
        assert not loads and LOADING not in err, argv
    assert not (tmp_path / "g").exists() and not (tmp_path / "m").exists()


@pytest.mark.parametrize("command", ["demo", "calibrate", "eval", "generate", "mitigate", "explain", "scan", "sweep"])
def test_a_status_line_says_the_model_is_loading(tmp_path, tiny_sd1, capsys, monkeypatch, command):
    import scanner.detect

    def stop(spec):
        raise MemscanError("stopped at the load")

    monkeypatch.setattr(scanner.detect.ScannerSpec, "load", stop)
    inp = tmp_path / "p.txt"
    inp.write_text("a cat\n")
    model = ["--model", str(tiny_sd1), "--device", "cpu"]
    argv = {
        "demo": ["demo", "--out", str(tmp_path / "demo")],
        "calibrate": ["calibrate", "--labels", str(default_labels_path()), "--out", str(tmp_path / "c.json"), *model],
        "eval": ["eval", "--json", str(tmp_path / "m.json"), *model],
        "generate": ["generate", "a cat", "--out", str(tmp_path / "g"), *model],
        "mitigate": ["mitigate", "a cat", "--out", str(tmp_path / "m"), "--target", "0.1", *model],
        "explain": ["explain", "a cat", *model],
        "scan": ["scan", str(inp), "--out", str(tmp_path / "s.jsonl"), *model],
        "sweep": ["sweep", str(inp), "--store", str(tmp_path / "s.db"), *model],
    }[command]
    assert main(argv) == EXIT_USAGE
    out, err = capsys.readouterr()
    loading, error = err.strip().splitlines()
    name = "scanner/data/testbed" if command == "demo" else re.escape(str(tiny_sd1))
    threads = r"\d+ threads? \((--threads|OMP_NUM_THREADS|CPUs available)\), load [\d.]+ on \d+ CPUs"
    assert re.fullmatch(rf"memscan: loading model \S*{name} on (cpu|cuda\S*) \({threads}\) \.\.\.", loading), loading
    assert error == "memscan: error: stopped at the load" and out == ""  # stdout stays the command's result


def test_score_space_option_is_recorded_and_converts_v_prediction(tmp_path, tiny_sd2):
    """`--score-space model` scores the raw v-prediction difference: epsilon-space scores / sqrt(abar_t0)."""
    import json

    import numpy as np
    import pyarrow.parquet as pq

    from scanner.detect import DetectSettings, Scanner
    from scanner.model import load_model

    inputs = tmp_path / "p.txt"
    inputs.write_text("a photo of a cat\nThe No Limits Business Woman Podcast\n")
    tables = {}
    for space in ("epsilon", "model"):
        out = tmp_path / f"{space}.parquet"
        assert main(["scan", str(inputs), "--model", str(tiny_sd2), "--out", str(out), "--score-space", space]) == 0
        tables[space] = pq.read_table(out).to_pylist()
    assert [json.loads(r["settings"])["score_space"] for r in tables["model"]] == ["model", "model"]
    scanner = Scanner(load_model(tiny_sd2, device="cpu"), DetectSettings())
    alpha_bar = float(scanner.schedule.scheduler.alphas_cumprod[int(scanner.timesteps[0])])
    ratio = np.array([e["score"] / m["score"] for e, m in zip(tables["epsilon"], tables["model"])])
    np.testing.assert_allclose(ratio, alpha_bar**0.5, rtol=1e-5)


def test_serve_takes_its_token_and_limits_from_the_options(tmp_path, tiny_sd1, capsys, monkeypatch):
    from fastapi.testclient import TestClient

    empty = tmp_path / "empty-token"
    empty.write_text("\n")
    code = main(["serve", "--model", str(tiny_sd1), "--token-file", str(empty)])
    assert "the token file is empty" in one_line_error(capsys, code)
    assert LOADING not in capsys.readouterr().err  # refused before the load
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    served = []
    monkeypatch.setattr("scanner.cli.serve.run_server", lambda app, *where: served.append(app))
    assert main(["serve", "--model", str(tiny_sd1), "--device", "cpu", "--token-file", str(token), "--max-concurrency", "3"]) == 0
    client = TestClient(served[0])
    assert client.post("/v1/score", json={"prompts": ["a cat"]}).status_code == 401
    answer = client.post("/v1/score", json={"prompts": ["a cat"]}, headers={"Authorization": "Bearer s3cret"})
    assert answer.status_code == 200 and len(answer.json()["results"]) == 1
    capsys.readouterr()
    code = main(["serve", "--model", str(tiny_sd1), "--max-concurrency", "0"])
    assert "--max-concurrency must be >= 1" in one_line_error(capsys, code)


def test_eval_with_a_named_detector_writes_its_metrics_and_scores(tmp_path, tiny_sd1):
    """`memscan eval --detector anisotropy`: the JSON and the per-prompt scores are the detector's own."""
    import json

    import numpy as np
    from sklearn.metrics import roc_auc_score

    from scanner.detect import DetectSettings, Scanner
    from scanner.detectors import create_detector
    from scanner.model import load_model

    prompts = ["a photo of a cat", "an oil painting of a castle", "The No Limits Business Woman Podcast", "x y z", "red", "night sky"]
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"prompt": p, "label": i % 2}) + "\n" for i, p in enumerate(prompts)))
    metrics, scores = tmp_path / "m.json", tmp_path / "s.jsonl"
    argv = ["eval", "--labels", str(labels), "--model", str(tiny_sd1), "--detector", "anisotropy", "--json", str(metrics),
            "--scores", str(scores)]
    assert main(argv) == 0
    summary = json.loads(metrics.read_text())
    rows = [json.loads(line) for line in scores.read_text().splitlines()]
    expected = create_detector("anisotropy", Scanner(load_model(tiny_sd1, device="cpu"), DetectSettings())).score(prompts)
    assert [r["prompt"] for r in rows] == prompts and [r["label"] for r in rows] == [i % 2 for i in range(6)]
    np.testing.assert_allclose([r["score"] for r in rows], expected, rtol=1e-5)
    assert summary["detector"] == "anisotropy" and summary["forwards_per_prompt"] == 2
    assert summary["auc"] == pytest.approx(roc_auc_score([r["label"] for r in rows], [r["score"] for r in rows]))
    assert (summary["n_pos"], summary["n_neg"]) == (3, 3) and summary["seconds"] > 0


def test_batch_size_defaults_to_the_devices_and_an_explicit_one_stays(tmp_path, tiny_sd1):
    import torch

    from scanner.cli.scan import scan_scanner
    from scanner.model import default_batch_size

    assert [default_batch_size(d) for d in ("cpu", "cuda", torch.device("cuda", 1), "mps")] == [16, 64, 64, 16]
    # On the CPU about 2**18 latent elements a batch, within [16, 256]; CUDA's stays 64.
    sizes = {(4, 128, 128): 16, (4, 64, 64): 16, (4, 32, 32): 64, (16, 16, 16): 64, (4, 8, 8): 256, (1, 2, 2): 256}
    assert {shape: default_batch_size("cpu", shape) for shape in sizes} == sizes
    assert default_batch_size("cuda", (4, 8, 8)) == 64
    for given, expected in ((None, 256), (7, 7)):  # the tiny model's latents are 4 x 8 x 8
        argv = ["scan", "p.txt", "--model", str(tiny_sd1), "--out", str(tmp_path / "s.jsonl"), "--device", "cpu"]
        args = build_parser().parse_args(argv + (["--batch-size", str(given)] if given else []))
        assert args.batch_size == given
        scanner = scan_scanner(args)[0]  # its scan plan's scanner (tests/test_plan.py)
        assert scanner.model.latent_shape == (4, 8, 8)
        assert args.batch_size == expected
