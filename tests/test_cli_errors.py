"""User mistakes in the long-running commands end in one line and exit 2, before the long work; bugs exit 1."""

from __future__ import annotations

import json

import pytest

from cli_output import one_line_error

from scanner.cli import EXIT_INTERNAL, EXIT_USAGE, main


def test_outputs_are_checked_before_the_work(tmp_path, tiny_sd1, capsys, monkeypatch):
    import scanner.detect
    import scanner.model
    import scanner.testbed.build
    import scanner.testbed.finetune

    def work_started(*args, **kwargs):
        raise AssertionError("the long work started before the outputs were checked")  # exit 1, not 2

    for module, name in ((scanner.detect.ScannerSpec, "load"), (scanner.model, "load_model"),
                         (scanner.testbed.build, "build_testbed"), (scanner.testbed.finetune, "run_finetune")):
        monkeypatch.setattr(module, name, work_started)
    folder = tmp_path / "a-folder"
    folder.mkdir()
    model = ["--model", str(tiny_sd1), "--device", "cpu"]
    assert "not a file" in one_line_error(capsys, main(["eval", *model, "--json", str(folder)]))
    err = one_line_error(capsys, main(["eval", *model, "--json", str(tmp_path / "m.json"), "--plot", str(tmp_path / "roc.xyz")]))
    assert "must end in" in err and ".png" in err
    assert "not a file" in one_line_error(capsys, main(["bench", *model, "--json", str(folder)]))
    assert "not a file" in one_line_error(
        capsys, main(["eval-mitigation", *model, "--json", str(tmp_path / "r.json"), "--markdown", str(folder)])
    )
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert "cannot write" in one_line_error(capsys, main(["testbed", "build", "--out", str(a_file / "sub"), "--smoke"]))
    assert "not a folder" in one_line_error(capsys, main(["testbed", "build", "--out", str(a_file), "--smoke"]))
    assert "not a folder" in one_line_error(capsys, main(["finetune", "--out", str(a_file), "--smoke", "--no-filter"]))
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--batch-size", "0"], "--batch-size"),
        (["bench", "--orchestrator", "--prompts", "-5"], "--prompts"),
        (["testbed", "build", "--out", "OUT", "--threads", "-1"], "--threads"),
        (["testbed", "build", "--out", "OUT", "--threads", "0"], "--threads"),
        (["finetune", "--out", "OUT", "--train-steps", "0", "--smoke"], "--train-steps"),
        (["scan", "INPUT", "--out", "OUT.jsonl", "--checkpoint-rows", "0"], "--checkpoint-rows"),
    ],
)
def test_counts_below_one_are_refused(tmp_path, capsys, argv, message):
    inp = tmp_path / "p.txt"
    inp.write_text("a cat\n")
    argv = [str(inp) if a == "INPUT" else str(tmp_path / a) if a.startswith("OUT") else a for a in argv]
    assert message in one_line_error(capsys, main(argv))
    assert not (tmp_path / "OUT").exists()


def test_finetune_compare_takes_an_unfiltered_then_a_filtered_report(tmp_path, capsys):
    from scanner.testbed.finetune import REPORT_KEYS

    def report(filtered: bool) -> str:
        path = tmp_path / f"{filtered}.json"
        body = dict.fromkeys(REPORT_KEYS, 0.0) | {"filtered": filtered, "filter": {"dropped_share": {}} if filtered else None}
        path.write_text(json.dumps(body))
        return str(path)

    unfiltered, filtered = report(False), report(True)
    assert "--compare" in one_line_error(capsys, main(["finetune", "--compare", filtered, unfiltered]))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"seconds": 1}))
    assert "--compare" in one_line_error(capsys, main(["finetune", "--compare", unfiltered, str(other)]))


def test_commands_that_need_autograd_offer_no_engine(capsys):
    for command in (["generate", "x", "--out", "o"], ["mitigate", "x", "--out", "o"], ["eval-mitigation", "--json", "j"]):
        with pytest.raises(SystemExit) as exited:
            main([*command, "--engine", "onnx"])
        assert exited.value.code == EXIT_USAGE and "--engine" in capsys.readouterr().err


def test_a_bug_exits_1_and_says_so(monkeypatch, capsys):
    import scanner.cli.testbed

    def broken(args):
        raise RuntimeError("an unexpected failure")

    monkeypatch.setattr(scanner.cli.testbed, "cmd_demo", broken)
    assert main(["demo"]) == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: an unexpected failure" in err and "internal error (a bug)" in err
