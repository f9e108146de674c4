"""`--detector` on scan, sweep and calibrate: the detector's own scores, its name in the settings record
(resumes, stores and calibrations never mix detectors), and Wen's record as it was before the option."""

from __future__ import annotations

import json
import shutil
import sqlite3
from dataclasses import asdict

import numpy as np
import pytest

from cli_output import one_line_error

from scanner.calibration import MODEL_CALIBRATION, fit_calibration, load_calibration
from scanner.cli import main
from scanner.detect import DetectSettings, Scanner
from scanner.detectors import AnisotropyDetector, AnisotropySettings, create_detector
from scanner.errors import MemscanError
from scanner.model import identify_model, load_model
from scanner.scan import run_scan, scanner_settings, settings_record
from scanner.sweep import normalize_prompt

PROMPTS = [f"a photo of item {i} on a table" for i in range(7)]
# The record of Wen's score on the tiny SD 1.x model as the code before --detector wrote it: it stays
# byte for byte, so existing outputs resume, stores keep their configs and calibrations apply.
WEN_RECORD = (
    '{"dtype": "float32", "end_step": 1, "engine": "torch", "generations": 1, "guidance_scale": 7.5, "noise": "shared", '
    '"num_inference_steps": 50, "score_space": "epsilon", "seed": 0, "start_step": 0}'
)
ANISOTROPY_RECORD = {**json.loads(WEN_RECORD), "detector": "anisotropy", "detector_settings": asdict(AnisotropySettings())}


@pytest.fixture(scope="module")
def scanner(tiny_sd1):
    return Scanner(load_model(tiny_sd1, device="cpu"), DetectSettings())


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def _rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_wen_keeps_the_record_it_had(scanner):
    assert settings_record(scanner.settings, scanner.model.dtype, scanner.engine.name) == WEN_RECORD
    assert scanner_settings(scanner, create_detector("wen", scanner)) == scanner_settings(scanner) == json.loads(WEN_RECORD)


def test_scan_with_a_detector_writes_its_scores_and_names_it(tmp_path, tiny_sd1, scanner, prompts, capsys):
    out = tmp_path / "scan.jsonl"
    argv = ["scan", str(prompts), "--model", str(tiny_sd1), "--device", "cpu", "--out", str(out), "--batch-size", "3"]
    assert main([*argv, "--detector", "anisotropy"]) == 0
    rows = _rows(out)
    detector = create_detector("anisotropy", scanner)
    # In the scan's batches: a batch of another size moves fp32 scores in the fifth digit.
    expected = np.concatenate([detector.score(PROMPTS[i : i + 3]) for i in range(0, len(PROMPTS), 3)])
    assert [r["score"] for r in rows] == pytest.approx(expected.tolist(), rel=1e-5)
    assert [r["scores"] for r in rows] == [[r["score"]] for r in rows]  # no per-generation scores: one element
    assert [r["n_tokens"] for r in rows] == scanner.family.tokenize(PROMPTS).n_tokens
    assert {r["settings"] for r in rows} == {json.dumps(ANISOTROPY_RECORD, sort_keys=True)}
    # Wen's scores of the same prompts differ: the detector was not ignored.
    assert not np.allclose(expected, scanner.score(PROMPTS).score, rtol=1e-3)


def test_resume_with_another_detector_is_refused(tmp_path, scanner, prompts, monkeypatch):
    out = tmp_path / "scan.jsonl"
    real, calls = AnisotropyDetector.score, []

    def crash_on_second_batch(self, batch, tokens=None):
        calls.append(len(batch))
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real(self, batch, tokens)

    monkeypatch.setattr(AnisotropyDetector, "score", crash_on_second_batch)
    detector = create_detector("anisotropy", scanner)
    with pytest.raises(RuntimeError):
        run_scan(scanner, [prompts], out, batch_size=3, commit_rows=3, detector=detector)
    with pytest.raises(MemscanError, match="different run"):
        run_scan(scanner, [prompts], out, batch_size=3, commit_rows=3)  # wen
    monkeypatch.setattr(AnisotropyDetector, "score", real)
    summary = run_scan(scanner, [prompts], out, batch_size=3, commit_rows=3, detector=detector)
    assert summary.resumed == 3 and summary.rows == len(PROMPTS)


def test_calibrate_with_a_detector_applies_to_it_only(tmp_path, tiny_sd1, prompts, capsys):
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"prompt": p, "label": i % 2}) + "\n" for i, p in enumerate(PROMPTS)))
    calibration = tmp_path / "calib.json"
    cpu = ["--model", str(tiny_sd1), "--device", "cpu"]
    assert main(["calibrate", "--labels", str(labels), *cpu, "--out", str(calibration), "--detector", "anisotropy"]) == 0
    assert load_calibration(calibration).settings == ANISOTROPY_RECORD
    scan = ["scan", str(prompts), *cpu, "--calibration", str(calibration)]
    capsys.readouterr()
    assert main([*scan, "--out", str(tmp_path / "a.jsonl"), "--detector", "anisotropy"]) == 0
    assert f"from calibration {calibration}" in capsys.readouterr().out
    threshold = load_calibration(calibration).threshold
    assert [r["flagged"] for r in _rows(tmp_path / "a.jsonl")] == [r["score"] >= threshold for r in _rows(tmp_path / "a.jsonl")]
    error = one_line_error(capsys, main([*scan, "--out", str(tmp_path / "w.jsonl")]))
    assert "other detection settings (detector 'anisotropy' vs None" in error


def test_a_model_calibration_for_wen_gives_another_detector_no_verdict(tmp_path, tiny_sd1, scanner, prompts, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_sd1, model)
    scores = scanner.score(PROMPTS).score
    fit_calibration(np.arange(len(PROMPTS)) % 2, scores, 0.5, model=identify_model(model)[1],
                    settings=scanner_settings(scanner)).save(model / MODEL_CALIBRATION)
    scan = ["scan", str(prompts), "--model", str(model), "--device", "cpu"]
    assert main([*scan, "--out", str(tmp_path / "w.jsonl")]) == 0
    assert "from the model's calibration" in capsys.readouterr().out  # it applies to wen
    assert main([*scan, "--out", str(tmp_path / "a.jsonl"), "--detector", "anisotropy"]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "does not apply" in line]
    assert len(warnings) == 1 and "detector" in warnings[0] and "flagged n/a (no threshold)" in captured.out
    assert {r["flagged"] for r in _rows(tmp_path / "a.jsonl")} == {None}


def test_sweep_with_a_detector_keeps_its_scores_apart(tmp_path, tiny_sd1, scanner, prompts, capsys):
    store, report = tmp_path / "s.db", tmp_path / "reports"
    sweep = ["sweep", str(prompts), "--model", str(tiny_sd1), "--device", "cpu", "--store", str(store), "--report", str(report)]
    assert main([*sweep, "--detector", "anisotropy", "--threshold=-1e9", "--top", "2"]) == 0
    with sqlite3.connect(store) as db:
        configs = db.execute("SELECT id, settings FROM configs").fetchall()
        stored = dict(db.execute("SELECT prompt, score FROM prompts"))
    assert [json.loads(settings) for _, settings in configs] == [ANISOTROPY_RECORD]
    expected = create_detector("anisotropy", scanner).score([normalize_prompt(p) for p in PROMPTS])
    assert [stored[normalize_prompt(p)] for p in PROMPTS] == pytest.approx(expected.tolist(), rel=1e-5)
    (summary_file,) = report.glob("sweep-1-*.json")
    summary = json.loads(summary_file.read_text())
    assert summary["settings"] == ANISOTROPY_RECORD
    # Word shares measure Wen's score, so another detector's top prompts are listed without them.
    assert len(summary["top"]) == 2 and all(entry["flagged"] and "words" not in entry for entry in summary["top"])
    assert "Words are not highlighted" in (report / summary["files"]["html"]).read_text()
    capsys.readouterr()
    # The same prompts for wen are new to the store: nothing is taken from the detector's rows.
    assert main(sweep) == 0
    assert f"{len(PROMPTS)} new, 0 already known" in capsys.readouterr().out
