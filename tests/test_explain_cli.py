"""`memscan explain`: JSON lines, terminal colouring, --input files, usage errors."""

from __future__ import annotations

import json

import pytest

from scanner.cli import EXIT_OK, EXIT_USAGE, main
from scanner.detect import DetectSettings, Scanner
from scanner.explain import explain
from scanner.model import load_model

PROMPT = "A photo of an Astronaut, riding a horse!"


@pytest.fixture(scope="module")
def scanner(tiny_sd1):
    return Scanner(load_model(tiny_sd1, device="cpu"), DetectSettings())


def test_json_lines_for_arguments_and_input_file(tmp_path, tiny_sd1, scanner, capsys):
    prompts_file = tmp_path / "p.txt"
    prompts_file.write_bytes(b"a red cube\n\xff bad bytes\na blue ball\n")
    expected = explain(scanner, [PROMPT, "a red cube", "a blue ball"], "ablation")
    threshold = expected[1].score  # "a red cube" is flagged, exactly at the threshold
    code = main(["explain", PROMPT, "--input", str(prompts_file), "--model", str(tiny_sd1), "--method", "ablation",
                 "--format", "json", "--threshold", repr(threshold)])
    out, err = capsys.readouterr()
    assert code == EXIT_OK
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in rows] == [PROMPT, "a red cube", "a blue ball"]
    assert f"{prompts_file}:2: not UTF-8" in err
    for row, want in zip(rows, expected):
        assert set(row) >= {"prompt", "score", "flagged", "method", "words"} and row["method"] == "ablation"
        assert row["score"] == pytest.approx(want.score, rel=1e-6)
        assert row["flagged"] == (want.score >= threshold)
        assert [(w["word"], w["share"]) for w in row["words"]] == [(w.word, pytest.approx(w.share, abs=1e-6)) for w in want.words]
    assert rows[1]["flagged"] is True


@pytest.mark.parametrize("color", ["always", "never"])
def test_terminal_output_colours_only_when_asked(tiny_sd1, capsys, color):
    code = main(["explain", PROMPT, "--model", str(tiny_sd1), "--color", color])
    out = capsys.readouterr().out
    assert code == EXIT_OK
    assert out.startswith("score ") and "no threshold: no verdict" in out
    assert ("\033[" in out) == (color == "always")
    if color == "never":
        assert "%]" in out  # shares shown in text instead


def test_usage_errors(tiny_sd1, capsys):
    assert main(["explain", "--model", str(tiny_sd1)]) == EXIT_USAGE
    assert "no prompts" in capsys.readouterr().err
    assert main(["explain", "x", "--model", str(tiny_sd1), "--noise", "reference"]) == EXIT_USAGE
    assert "use the shared initial latents" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["explain", "--help"])
    assert exc.value.code == 0 and "exit codes" in capsys.readouterr().out


def test_the_verdict_can_come_from_a_calibration(tiny_sd1, capsys):
    from scanner.calibration import load_calibration
    from scanner.testbed import default_labels_path, default_model_path

    shipped = default_model_path() / "calibration.json"
    rows = [json.loads(line) for line in default_labels_path().read_text().splitlines()]
    planted = next(r["prompt"] for r in rows if r["kind"] == "planted")
    normal = next(r["prompt"] for r in rows if r["kind"] == "normal_unseen")
    assert main(["explain", planted, normal, "--calibration", str(shipped), "--format", "json"]) == EXIT_OK
    explained = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    threshold = load_calibration(shipped).threshold
    assert [r["flagged"] for r in explained] == [r["score"] >= threshold for r in explained] == [True, False]
    # Refused for another model, before anything is explained.
    assert main(["explain", PROMPT, "--model", str(tiny_sd1), "--calibration", str(shipped)]) == EXIT_USAGE
    assert "calibration is for model" in capsys.readouterr().err


def test_a_flagged_prompt_gets_the_suggested_set_and_a_safe_one_none(tiny_sd1, scanner, capsys):
    score = scanner.score([PROMPT]).score[0]
    just_under = repr(float(score) - 1e-6)  # PROMPT flagged; some word's removal gets it under
    assert main(["explain", PROMPT, "--model", str(tiny_sd1), "--threshold", just_under, "--color", "never"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "FLAGGED" in out and "  most significant (ablation): " in out
    (line,) = [line for line in out.splitlines() if line.startswith("  suggested: drop ")]
    assert "(safe)" in line
    assert main(["explain", PROMPT, "--model", str(tiny_sd1), "--threshold", just_under, "--format", "json"]) == EXIT_OK
    row = json.loads(capsys.readouterr().out)
    assert row["method"] == "ablation" and row["suggestion"]["safe"] and row["suggestion"]["score"] < float(just_under)
    assert f'"{row["words"][row["suggestion"]["words"][0]]["word"]}"' in line
    assert main(["explain", PROMPT, "--model", str(tiny_sd1), "--threshold", repr(float(score) + 1), "--format", "json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["suggestion"] is None
