"""Calibration: the threshold choice against a brute-force search on fresh random scores, refusal for
another model or other settings, and `memscan calibrate` -> `--calibration` on the bundled testbed."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cli_output import one_line_error

from scanner.calibration import Calibration, fit_calibration, fit_threshold, load_calibration
from scanner.cli import main
from scanner.detect import DetectSettings, Scanner
from scanner.errors import MemscanError
from scanner.evaluate import read_labelled_prompts
from scanner.model import identify_model, load_model
from scanner.scan import scanner_settings

SETTINGS = {**DetectSettings().to_dict(), "dtype": "float32", "engine": "torch"}


def _brute_force(labels: np.ndarray, scores: np.ndarray, target_fpr: float) -> np.ndarray:
    """The flags of the best rule `score >= t` over every t: highest TPR with FPR <= target, then lowest FPR."""
    best = None
    for t in [*np.unique(scores), np.inf]:
        flags = scores >= t
        tpr, fpr = flags[labels].mean(), flags[~labels].mean()
        if fpr <= target_fpr and (best is None or (tpr, -fpr) > best[0]):
            best = ((tpr, -fpr), flags)
    return best[1]


def _random_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    n = int(rng.integers(4, 400))
    labels = rng.integers(0, 2, size=n).astype(bool)
    labels[:2] = [False, True]
    scores = rng.normal(size=n) + rng.uniform(0, 3) * labels
    if rng.random() < 0.5:
        scores = np.round(scores, 1)  # ties, also across the labels
    target = float(rng.choice([0.0, 0.01, 0.05, rng.uniform(0, 0.5)]))
    return labels, scores, target


def test_threshold_is_the_brute_force_optimum_on_random_scores():
    rng = np.random.default_rng()
    for _ in range(300):
        labels, scores, target = _random_case(rng)
        threshold = fit_threshold(labels, scores, target)
        expected = _brute_force(labels, scores, target)
        np.testing.assert_array_equal(scores >= threshold, expected)
        calibration = fit_calibration(labels, scores, target, model="m", settings=SETTINGS)
        assert calibration.threshold == threshold
        assert calibration.fpr == expected[~labels].mean() <= target
        assert calibration.tpr == expected[labels].mean()
        assert calibration.auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        assert (calibration.n_pos, calibration.n_neg) == (labels.sum(), (~labels).sum())


def test_bad_target_or_one_sided_labels_are_refused():
    scores = np.random.default_rng().normal(size=10)
    with pytest.raises(MemscanError, match="target FPR"):
        fit_calibration(np.arange(10) % 2, scores, 1.0, model="m", settings=SETTINGS)
    with pytest.raises(MemscanError, match="both"):
        fit_calibration(np.ones(10), scores, 0.01, model="m", settings=SETTINGS)


def test_labelled_prompts_with_a_bad_row_are_refused_at_that_row(tmp_path):
    rng = random.Random()
    good = [{"prompt": f"a photo of thing {rng.randrange(10**6)}", "label": i % 2} for i in range(rng.randint(2, 8))]
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in good))
    assert [(r["prompt"], r["label"]) for r in read_labelled_prompts(path)] == [(r["prompt"], r["label"]) for r in good]
    bad_rows = (
        {"prompt": None, "label": 0},
        {"prompt": 7, "label": 1},
        {"prompt": ["a cat"], "label": 0},
        {"label": 1},
        {"prompt": "a cat", "label": 2},
        ["a cat", 1],
    )
    for bad in bad_rows:
        path.write_text("".join(json.dumps(row) + "\n" for row in [*good, bad]))
        with pytest.raises(MemscanError) as refused:
            read_labelled_prompts(path)
        assert str(refused.value) == f"{path}:{len(good) + 1}: each row needs 'prompt' (a string) and 'label' (0 or 1)"


def _calibration(model: str = "sha256:0123456789abcdef", settings: dict = SETTINGS) -> Calibration:
    rng = np.random.default_rng()
    labels = np.arange(200) % 4 == 0
    return fit_calibration(labels, rng.normal(size=200) + 2 * labels, 0.01, model=model, settings=settings)


def test_check_refuses_another_model_or_other_settings_in_one_line():
    calibration = _calibration()
    calibration.check(calibration.model, dict(SETTINGS))
    with pytest.raises(MemscanError, match="for model sha256:0123456789abcdef, not sha256:ffff") as refused:
        calibration.check("sha256:ffff", SETTINGS)
    assert "\n" not in str(refused.value)
    for key, value in (("end_step", 5), ("dtype", "float16"), ("seed", 7)):
        with pytest.raises(MemscanError, match=f"other detection settings \\({key} ") as refused:
            calibration.check(calibration.model, {**SETTINGS, key: value})
        assert "\n" not in str(refused.value)
    # The engine says how a score was computed: a calibration made with one applies to another's scores.
    calibration.check(calibration.model, {**SETTINGS, "engine": "onnx"})
    with pytest.raises(MemscanError, match="other detection settings \\(dtype .*\\); use") as refused:
        calibration.check(calibration.model, {**SETTINGS, "engine": "onnx", "dtype": "float16"})
    assert "engine" not in str(refused.value)


def test_save_and_load_round_trip_and_bad_files(tmp_path):
    calibration = _calibration()
    path = tmp_path / "calib.json"
    calibration.save(path)
    assert load_calibration(path) == calibration
    assert json.loads(path.read_text())["rule"] == "flagged when score >= threshold"
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"threshold": 1.0}))
    for name, reason in (("missing.json", "no such calibration file"), ("bad.json", "invalid JSON"), ("other.json", "missing")):
        with pytest.raises(MemscanError, match=reason):
            load_calibration(tmp_path / name)


def test_calibrate_then_scan_with_the_calibration_on_the_testbed(planted_testbed, tmp_path, capsys):
    model, rows = planted_testbed
    rng = random.Random()
    sample = rng.sample([r for r in rows if r["label"] == 1], 4) + rng.sample([r for r in rows if r["label"] == 0], 12)
    rng.shuffle(sample)
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in sample))
    out = tmp_path / "calib.json"
    cpu = ["--device", "cpu"]
    assert main(["calibrate", "--labels", str(labels), "--target-fpr", "0.1", "--out", str(out), *cpu]) == 0
    assert "threshold" in capsys.readouterr().out
    calibration = load_calibration(out)

    scanner = Scanner(load_model(model, device="cpu"), DetectSettings())
    assert calibration.model == identify_model(model)[1] and calibration.settings == scanner_settings(scanner)
    scores = scanner.score([r["prompt"] for r in sample]).score
    is_memorized = np.array([r["label"] == 1 for r in sample])
    np.testing.assert_array_equal(scores >= calibration.threshold, _brute_force(is_memorized, scores, 0.1))
    assert (calibration.n_pos, calibration.n_neg, calibration.target_fpr) == (4, 12, 0.1)
    assert calibration.fpr <= 0.1 and calibration.labels == str(labels)

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in sample))
    scan_out = tmp_path / "scan.jsonl"
    assert main(["scan", str(prompts), "--out", str(scan_out), "--calibration", str(out), *cpu]) == 0
    scanned = [json.loads(line) for line in scan_out.read_text().splitlines()]
    # The scan rejects an empty prompt (the testbed has one random token string of 0 tokens); calibrate scores it.
    assert [r["prompt"] for r in scanned] == [r["prompt"] for r in sample if r["prompt"].strip()]
    expected = {r["prompt"]: bool(score >= calibration.threshold) for r, score in zip(sample, scores)}
    assert [r["flagged"] for r in scanned] == [expected[r["prompt"]] for r in scanned]

    other = ["scan", str(prompts), "--out", str(tmp_path / "other.jsonl"), "--calibration", str(out), *cpu]
    assert "other detection settings (end_step 1 vs 2" in one_line_error(capsys, main([*other, "--steps", "2"]))
    with pytest.raises(SystemExit) as both:
        main([*other, "--threshold", "0.5"])
    assert both.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_serve_takes_the_threshold_from_a_calibration_and_refuses_a_foreign_one(tiny_sd1, tmp_path, capsys, monkeypatch):
    from fastapi.testclient import TestClient

    scanner = Scanner(load_model(tiny_sd1, device="cpu"), DetectSettings())
    own, foreign = tmp_path / "own.json", tmp_path / "foreign.json"
    _calibration(identify_model(tiny_sd1)[1], scanner_settings(scanner)).save(own)
    _calibration().save(foreign)
    served = []
    monkeypatch.setattr("scanner.cli.serve.run_server", lambda app, *where: served.append(app))
    serve = ["serve", "--model", str(tiny_sd1), "--device", "cpu", "--calibration"]
    assert main([*serve, str(own)]) == 0
    assert f"from calibration {own}" in capsys.readouterr().err
    with TestClient(served[0]) as client:
        assert client.get("/healthz").json()["threshold"] == load_calibration(own).threshold
    assert "GET /healthz 200" in capsys.readouterr().err  # the request log
    assert "not sha256:" in one_line_error(capsys, main([*serve, str(foreign)]))
    assert len(served) == 1


def test_the_shipped_testbed_calibration_is_for_the_shipped_model(planted_testbed):
    model, rows = planted_testbed
    check_shipped_calibration(model, rows, "memscan calibrate --labels scanner/data/testbed/eval_prompts.jsonl "
                              "--target-fpr 0.01 --out scanner/data/testbed/calibration.json")


def check_shipped_calibration(model, rows: list[dict], command: str) -> None:
    """A bundled testbed's calibration.json: made by `command` for this model, the default settings and all its labels."""
    regenerate = f"regenerate it: {command}"
    calibration = load_calibration(model / "calibration.json")
    assert calibration.model == identify_model(model)[1], f"calibration.json is stale (the testbed was rebuilt); {regenerate}"
    assert calibration.settings == scanner_settings(Scanner(load_model(model, device="cpu"), DetectSettings())), regenerate
    assert calibration.target_fpr == 0.01 and calibration.fpr <= 0.01
    assert (calibration.n_pos, calibration.n_neg) == (sum(r["label"] for r in rows), sum(1 - r["label"] for r in rows))


def test_a_dose_builds_copies_are_kept_and_bad_ones_refused(tmp_path):
    path = tmp_path / "labels.jsonl"
    rows = [{"prompt": "a", "label": 1, "kind": "planted", "copies": 4}, {"prompt": "b", "label": 0}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert [r.get("copies") for r in read_labelled_prompts(path)] == [4, None]
    for bad in (0, -2, 1.5, "4", True):
        path.write_text("".join(json.dumps(row) + "\n" for row in [{**rows[0], "copies": bad}, rows[1]]))
        with pytest.raises(MemscanError, match=r"labels.jsonl:1: 'copies' must be a positive integer"):
            read_labelled_prompts(path)


def test_detection_by_copies_is_the_share_flagged_at_the_brute_force_1pct_threshold():
    from scanner.evaluate import summarize

    rng = np.random.default_rng()
    counts = (1, 2, 4, 8)
    for _ in range(50):
        copies = rng.choice(counts, size=int(rng.integers(20, 80)))
        memorized = rng.random(len(copies)) < copies / 10  # more copies, more often memorized
        normal = int(rng.integers(100, 400))
        labels = np.concatenate([memorized, np.zeros(normal, dtype=bool)])
        scores = rng.normal(size=len(labels)) + rng.uniform(0, 3) * labels
        rows = [{"prompt": str(i), "label": int(label), "kind": "k", **({"copies": int(copies[i])} if i < len(copies) else {})}
                for i, label in enumerate(labels)]
        if not memorized.any():
            continue
        result = summarize(rows, scores)["detection_by_copies"]
        flagged = _brute_force(labels, scores, 0.01)  # the flags of the best threshold within 1% FPR
        for count in sorted(set(copies.tolist())):
            group = np.flatnonzero(copies == count)
            assert result[str(count)] == {"n": len(group), "memorized": int(labels[group].sum()),
                                          "detected": pytest.approx(flagged[group].mean())}
        assert set(result) == {"threshold", *map(str, set(copies.tolist()))}
