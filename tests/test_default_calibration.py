"""A model folder's own calibration.json: applied by scan, explain, serve and sweep when it was made for the
model and settings, said where it comes from; `--no-calibration` turns it off; a mismatch is one stderr line and
no verdict (exit 0); `--threshold` and `--calibration` take precedence."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cli_output import STATUS

from scanner.calibration import Calibration, Threshold, choose_threshold, fit_calibration
from scanner.cli import main
from scanner.detect import DetectSettings, Scanner
from scanner.errors import MemscanError
from scanner.model import identify_model, load_model
from scanner.scan import scanner_settings

PROMPTS = ["a red square on grass", "The No Limits Business Woman Podcast", "a blue circle", "1914 poster"]


def _fitted(model: str, settings: dict, scores: np.ndarray) -> Calibration:
    """A calibration whose threshold falls between the scores: the 2 highest are the memorized ones."""
    labels = scores >= np.sort(scores)[-2]
    return fit_calibration(labels, scores, 0.0, model=model, settings=settings)


@pytest.fixture(scope="module")
def calibrated(tiny_sd1, tmp_path_factory):
    """A copy of the tiny model with its own calibration.json, its prompt file, and the prompts' scores."""
    model = tmp_path_factory.mktemp("calibrated") / "model"
    shutil.copytree(tiny_sd1, model)
    scanner = Scanner(load_model(model, device="cpu"), DetectSettings())
    scores = scanner.score(PROMPTS).score
    calibration = _fitted(identify_model(model)[1], scanner_settings(scanner), scores)
    calibration.save(model / "calibration.json")
    prompts = model.parent / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return model, prompts, calibration, scores


def _scan(model, prompts, out, *options) -> list:
    assert main(["scan", str(prompts), "--model", str(model), "--device", "cpu", "--out", str(out), *options]) == 0
    return [json.loads(line)["flagged"] for line in out.read_text().splitlines()]


def _messages(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("memscan:") and not line.startswith(STATUS)]


def test_scan_applies_the_model_calibration_and_says_so(calibrated, tmp_path, capsys):
    model, prompts, calibration, scores = calibrated
    assert _scan(model, prompts, tmp_path / "a.jsonl") == (scores >= calibration.threshold).tolist()
    out = capsys.readouterr().out
    assert f"flagged 2 (threshold {calibration.threshold:.3g} from the model's calibration {model / 'calibration.json'})" in out
    assert _scan(model, prompts, tmp_path / "b.jsonl", "--no-calibration") == [None] * len(PROMPTS)
    assert "flagged n/a (no threshold)" in capsys.readouterr().out
    assert _scan(model, prompts, tmp_path / "c.jsonl", "--threshold", "-1") == [True] * len(PROMPTS)
    assert "threshold -1 from --threshold" in capsys.readouterr().out


def test_a_model_calibration_for_other_settings_is_one_line_and_no_verdict(calibrated, tmp_path, capsys):
    model, prompts, _, _ = calibrated
    assert _scan(model, prompts, tmp_path / "s.jsonl", "--steps", "2") == [None] * len(PROMPTS)
    (line,) = _messages(capsys)
    assert "does not apply" in line and "end_step 1 vs 2" in line and "without a verdict" in line
    # Given explicitly, the same calibration is refused.
    code = main(["scan", str(prompts), "--model", str(model), "--device", "cpu", "--out", str(tmp_path / "t.jsonl"),
                 "--steps", "2", "--calibration", str(model / "calibration.json")])
    assert code == 2 and "other detection settings" in capsys.readouterr().err


def test_explain_serve_and_sweep_take_the_same_default(calibrated, tmp_path, capsys, monkeypatch):
    from fastapi.testclient import TestClient

    model, prompts, calibration, scores = calibrated
    cpu = ["--model", str(model), "--device", "cpu"]
    assert main(["explain", PROMPTS[1], *cpu, "--format", "json"]) == 0
    captured = capsys.readouterr()
    row = json.loads(captured.out)
    assert row["threshold"] == calibration.threshold and row["flagged"] == bool(scores[1] >= calibration.threshold)
    assert f"threshold {calibration.threshold:.3g} from the model's calibration" in captured.err

    served = []
    monkeypatch.setattr("scanner.cli.serve.run_server", lambda app, *where: served.append(app))
    assert main(["serve", *cpu]) == 0 and main(["serve", *cpu, "--no-calibration"]) == 0
    with TestClient(served[0]) as client, TestClient(served[1]) as plain:
        assert client.get("/healthz").json()["threshold"] == calibration.threshold
        assert plain.get("/healthz").json()["threshold"] is None
    capsys.readouterr()

    assert main(["sweep", str(prompts), "--store", str(tmp_path / "s.db"), "--report", str(tmp_path / "r"), *cpu]) == 0
    assert "flagged 2 (threshold" in capsys.readouterr().out
    (report,) = tmp_path.joinpath("r").glob("*.json")
    assert json.loads(report.read_text())["threshold_source"] == f"the model's calibration {model / 'calibration.json'}"


def test_choose_threshold_order(tmp_path):
    settings = {**DetectSettings().to_dict(), "dtype": "float32", "engine": "torch"}
    own = _fitted("m", settings, np.arange(10.0))
    own.save(tmp_path / "calibration.json")
    other = _fitted("m", settings, np.arange(10.0) * 3)
    warnings = []
    choose = lambda **kw: choose_threshold("m", settings, model_path=tmp_path, warn=warnings.append, **kw)  # noqa: E731
    own_file = tmp_path / "calibration.json"
    assert choose() == Threshold(own.threshold, f"the model's calibration {own_file}", str(own_file))
    assert choose(threshold=0.5) == Threshold(0.5, "--threshold")
    assert choose(calibration=other, calibration_file="o.json") == Threshold(other.threshold, "calibration o.json", "o.json")
    assert choose(use_model_calibration=False) == Threshold(None)
    assert choose_threshold("x", settings, model_path=tmp_path, warn=warnings.append) == Threshold(None)
    assert len(warnings) == 1 and "not x" in warnings[0]
    with pytest.raises(MemscanError, match="not x"):
        choose_threshold("x", settings, calibration=other)
    assert Threshold(0.62805956).describe() == "threshold 0.628" and Threshold(None).describe() == "no threshold"
