"""`memscan scan`: inputs of every format, rejects, resume after a crash or SIGKILL, exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cli_output import one_line_error

from scanner import scan as scan_module
from scanner.cli import main
from scanner.detect import DetectSettings, Scanner
from scanner.model import load_model

PROMPTS = [f"a photo of item {i} on a table" for i in range(23)]


@pytest.fixture(scope="module")
def scanner(tiny_sd1):
    return Scanner(load_model(tiny_sd1, device="cpu"), DetectSettings())


def _read_output(path):
    if str(path).endswith(".parquet"):
        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _rejects(out):
    return [json.loads(line) for line in open(out.with_name(out.stem + ".rejects.jsonl"), encoding="utf-8")]


def test_every_format_with_rejects(tmp_path, tiny_sd1, scanner, capsys):
    txt = tmp_path / "p.txt"
    txt.write_bytes(b"a red cube\n\nbad \xff bytes\na blue ball\n")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(
        "\n".join(
            [json.dumps({"caption": "a green cone"}), json.dumps({"caption": 7}), json.dumps({"other": "x"}), "{broken", json.dumps(["x"])]
        )
        + "\n"
    )
    csv_path = tmp_path / "p.csv"
    csv_path.write_bytes(b'id,prompt\n1,"a cat, sitting"\n2,\n3,caf\xe9 au lait\n')
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": ["a dog", None, "a bird"]}), parquet)
    out = tmp_path / "scan.parquet"

    code = main(["scan", str(txt), str(jsonl), str(csv_path), str(parquet), "--model", str(tiny_sd1), "--out", str(out), "--threshold", "0"])
    assert code == 0
    rows = _read_output(out)
    assert [r["id"] for r in rows] == [f"{txt}:1", f"{txt}:4", f"{jsonl}:1", f"{csv_path}:1", f"{parquet}:1", f"{parquet}:3"]
    prompts = [r["prompt"] for r in rows]
    assert prompts == ["a red cube", "a blue ball", "a green cone", "a cat, sitting", "a dog", "a bird"]
    expected = scanner.score(prompts)
    for row, score, per_gen in zip(rows, expected.score, expected.per_generation):
        assert row["score"] == pytest.approx(float(score), rel=1e-5)
        assert row["scores"] == pytest.approx(per_gen.tolist(), rel=1e-5)
        assert row["flagged"] is True and row["model"] == scanner.model.fingerprint
        assert json.loads(row["settings"])["end_step"] == 1
    reasons = {r["id"]: r["reason"] for r in _rejects(out)}
    assert reasons == {
        f"{txt}:2": "empty prompt",
        f"{txt}:3": "not UTF-8",
        f"{jsonl}:2": "field 'caption' is not a string",
        f"{jsonl}:3": "no prompt, caption or text field",
        f"{jsonl}:4": reasons[f"{jsonl}:4"],
        f"{jsonl}:5": "not a JSON object",
        f"{csv_path}:2": "empty prompt",
        f"{csv_path}:3": "not UTF-8",
        f"{parquet}:2": "missing value",
    }
    assert reasons[f"{jsonl}:4"].startswith("invalid JSON")
    assert "scored 6" in capsys.readouterr().out
    assert not out.with_name(out.name + ".parts").exists()


REAL_SUBMIT = Scanner.submit


def _crashing_on_batch(crash_at: int):
    """`Scanner.submit` that raises on its `crash_at`-th call (1-based), a crash mid-scan."""
    calls = {"n": 0}

    def score(self, prompts, indices=None, tokens=None):
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise RuntimeError("simulated crash")
        return REAL_SUBMIT(self, prompts, indices, tokens)

    return score


def test_resume_after_crash_loses_and_duplicates_nothing(tmp_path, scanner, monkeypatch):
    inp = tmp_path / "p.txt"
    inp.write_text("\n".join(PROMPTS + ["", "a photo of item 3 on a table"]) + "\n")
    out = tmp_path / "scan.jsonl"
    monkeypatch.setattr(Scanner, "submit", _crashing_on_batch(4))
    with pytest.raises(RuntimeError):
        scan_module.run_scan(scanner, [inp], out, batch_size=3, commit_rows=4)
    assert not out.exists()
    monkeypatch.setattr(Scanner, "submit", REAL_SUBMIT)
    summary = scan_module.run_scan(scanner, [inp], out, batch_size=3, commit_rows=4)
    assert summary.resumed > 0 and summary.rows == len(PROMPTS) + 1 and summary.rejected == 1
    rows = _read_output(out)
    assert [r["id"] for r in rows] == [f"{inp}:{i}" for i in range(1, len(PROMPTS) + 1)] + [f"{inp}:{len(PROMPTS) + 2}"]
    expected = scanner.score([r["prompt"] for r in rows]).score
    assert [r["score"] for r in rows] == pytest.approx(expected.tolist(), rel=1e-5)


def test_resume_after_sigkill(tmp_path, tiny_sd1, capsys):
    inp = tmp_path / "p.txt"
    inp.write_text("\n".join(f"prompt number {i}" for i in range(64)) + "\n")
    out = tmp_path / "scan.parquet"
    cmd = [sys.executable, "-m", "scanner.cli", "scan", str(inp), "--model", str(tiny_sd1), "--out", str(out)]
    cmd += ["--batch-size", "2", "--checkpoint-rows", "4", "--generations", "2"]
    parts = tmp_path / "scan.parquet.parts"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(list(parts.glob("*.parquet"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "scan finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert main(cmd[3:]) == 0  # the re-run, in this process: the kill was the other one's
    assert "rows resumed" in capsys.readouterr().out
    rows = _read_output(out)
    assert [r["id"] for r in rows] == [f"{inp}:{i}" for i in range(1, 65)]
    assert [r["prompt"] for r in rows] == [f"prompt number {i}" for i in range(64)]
    scanner = Scanner(load_model(tiny_sd1, device="cpu"), DetectSettings(generations=2))
    sample = [0, 1, 32, 63]
    expected = scanner.score([rows[i]["prompt"] for i in sample]).score
    assert [rows[i]["score"] for i in sample] == pytest.approx(expected.tolist(), rel=1e-5)


def test_user_errors_exit_2_with_one_line(tmp_path, tiny_sd1, capsys):
    inp = tmp_path / "p.txt"
    inp.write_text("a cat\n")
    model = ["--model", str(tiny_sd1)]
    assert "no such file" in one_line_error(capsys, main(["scan", str(tmp_path / "missing.txt"), *model, "--out", str(tmp_path / "o.jsonl")]))
    assert "unsupported input" in one_line_error(capsys, main(["scan", str(tmp_path / "x.docx"), *model, "--out", str(tmp_path / "o.jsonl")]))
    assert "does not exist" in one_line_error(capsys, main(["scan", str(inp), "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o.jsonl")]))
    assert "not a Stable Diffusion" in one_line_error(capsys, main(["scan", str(inp), "--model", str(tmp_path), "--out", str(tmp_path / "o.jsonl")]))
    assert "does not exist" in one_line_error(capsys, main(["scan", str(inp), *model, "--out", str(tmp_path / "no" / "o.jsonl")]))
    assert "must end in" in one_line_error(capsys, main(["scan", str(inp), *model, "--out", str(tmp_path / "o.txt")]))
    assert "step window" in one_line_error(capsys, main(["scan", str(inp), *model, "--out", str(tmp_path / "o.jsonl"), "--steps", "0"]))
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("a,b\n1,2\n")
    assert "--field" in one_line_error(capsys, main(["scan", str(csv_path), *model, "--out", str(tmp_path / "o.jsonl")]))


def test_unwritable_output_exits_2(tmp_path, tiny_sd1, capsys):
    inp = tmp_path / "p.txt"
    inp.write_text("a cat\n")
    # /proc refuses new files even to root; a mode-0500 folder refuses everyone else.
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    for folder in ([locked] if os.geteuid() else []) + [Path("/proc")]:
        err = one_line_error(capsys, main(["scan", str(inp), "--model", str(tiny_sd1), "--out", str(folder / "o.jsonl")]))
        assert "not writable" in err or "cannot write" in err


def test_existing_output_and_foreign_partial_are_refused(tmp_path, tiny_sd1, capsys):
    inp = tmp_path / "p.txt"
    inp.write_text("a cat\n")
    out = tmp_path / "o.jsonl"
    args = ["scan", str(inp), "--model", str(tiny_sd1), "--out", str(out)]
    assert main(args) == 0
    capsys.readouterr()
    assert "already exists" in one_line_error(capsys, main(args))
    assert main([*args, "--overwrite"]) == 0
    (tmp_path / "o.jsonl.parts").mkdir()
    (tmp_path / "o.jsonl.parts" / "manifest.json").write_text('{"other": "run"}')
    capsys.readouterr()
    assert "different run" in one_line_error(capsys, main(args))


def test_fail_on_flagged_exit_code(tmp_path, tiny_sd1):
    inp = tmp_path / "p.txt"
    inp.write_text("a cat\na dog\n")
    base = ["scan", str(inp), "--model", str(tiny_sd1), "--fail-on-flagged"]
    assert main([*base, "--out", str(tmp_path / "a.jsonl"), "--threshold", "0"]) == 3
    assert main([*base, "--out", str(tmp_path / "b.jsonl"), "--threshold", "1e9"]) == 0
    assert [r["flagged"] for r in _read_output(tmp_path / "b.jsonl")] == [False, False]


def test_help_for_every_command():
    for argv in (["--help"], ["scan", "--help"]):
        proc = subprocess.run([sys.executable, "-m", "scanner.cli", *argv], capture_output=True, text=True)
        assert proc.returncode == 0 and "exit codes" in proc.stdout
    # Every subcommand, nested ones included, documents its exit codes.
    from scanner.cli import build_parser

    pending, seen = [("memscan", build_parser())], []
    while pending:
        name, parser = pending.pop()
        seen.append(name)
        assert "exit codes" in parser.format_help(), name
        for action in parser._subparsers._group_actions if parser._subparsers else []:
            pending += [(f"{name} {sub}", child) for sub, child in action.choices.items()]
    assert {"memscan bench", "memscan testbed build", "memscan demo", "memscan eval-mitigation"} <= set(seen)


def test_field_and_recursive_globs_pick_the_prompts(tmp_path, tiny_sd1, scanner):
    # --field chooses a column over the defaults; "**" reaches subfolders, in sorted order.
    (tmp_path / "logs" / "b").mkdir(parents=True)
    first, second = tmp_path / "logs" / "a.jsonl", tmp_path / "logs" / "b" / "c.jsonl"
    first.write_text(json.dumps({"prompt": "not this one", "query": "a red cube"}) + "\n")
    second.write_text(json.dumps({"prompt": "nor this", "query": "a blue ball"}) + "\n")
    csv_path = tmp_path / "logs" / "b" / "d.csv"
    csv_path.write_text("prompt,query\nnot this,a green cone\n")
    out = tmp_path / "o.jsonl"
    assert main(["scan", str(tmp_path / "logs" / "**" / "*.*"), "--field", "query", "--model", str(tiny_sd1), "--out", str(out)]) == 0
    rows = _read_output(out)
    assert [(r["id"], r["prompt"]) for r in rows] == [
        (f"{first}:1", "a red cube"), (f"{second}:1", "a blue ball"), (f"{csv_path}:1", "a green cone")
    ]
    assert [r["score"] for r in rows] == pytest.approx(scanner.score([r["prompt"] for r in rows]).score.tolist(), rel=1e-5)


@pytest.mark.parametrize("engine", ["torch", "auto"])  # auto: the scan plan's scanner (tests/test_plan.py)
def test_identical_prompts_are_scored_once(tmp_path, tiny_sd1, monkeypatch, engine):
    from scanner.plan import PlanEngine

    warm = tmp_path / "warm.txt"
    warm.write_text("compiles the plan first\n")
    common = ["--model", str(tiny_sd1), "--batch-size", "4", "--engine", engine]
    assert main(["scan", str(warm), "--out", str(tmp_path / "warm.jsonl"), *common]) == 0  # the plan's own check runs it
    computed: list[int] = []
    owner, method = (Scanner, "_compute") if engine == "torch" else (PlanEngine, "submit")
    original = getattr(owner, method)

    def counting(self, tokens, *args, **kwargs):
        computed.append(len(tokens.n_tokens))
        return original(self, tokens, *args, **kwargs)

    monkeypatch.setattr(owner, method, counting)
    prompts = [f"a photo of item {i % 5}" for i in range(17)]  # 5 distinct prompts, repeated across batches
    inp = tmp_path / "p.txt"
    inp.write_text("\n".join(prompts) + "\n")
    out = tmp_path / "o.jsonl"
    assert main(["scan", str(inp), "--out", str(out), *common]) == 0
    assert sum(computed) == 5
    scores = {}
    for row in _read_output(out):
        scores.setdefault(row["prompt"], set()).add(row["score"])
    assert len(scores) == 5 and all(len(s) == 1 for s in scores.values())


@pytest.mark.parametrize("seconds_per_batch", [0.0, 31.0])
def test_commits_every_30_seconds_whatever_the_row_count(tmp_path, scanner, monkeypatch, seconds_per_batch):
    inp = tmp_path / "p.txt"
    inp.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "scan.jsonl"
    clock = {"now": 0.0}

    def monotonic() -> float:  # each reading is one batch later
        clock["now"] += seconds_per_batch
        return clock["now"]

    # Only scan.py's clock: the real one keeps running for threads and pytest.
    monkeypatch.setattr(scan_module, "time", SimpleNamespace(monotonic=monotonic, perf_counter=time.perf_counter))
    monkeypatch.setattr(Scanner, "submit", _crashing_on_batch(4))
    with pytest.raises(RuntimeError):
        scan_module.run_scan(scanner, [inp], out, batch_size=3, commit_rows=10**6)
    monkeypatch.setattr(Scanner, "submit", REAL_SUBMIT)
    summary = scan_module.run_scan(scanner, [inp], out, batch_size=3, commit_rows=10**6)
    # Far from --checkpoint-rows, only the clock commits: each of the 3 scored batches when 30 s pass, else none.
    assert summary.resumed == (9 if seconds_per_batch > 30 else 0)
    assert [r["prompt"] for r in _read_output(out)] == PROMPTS
