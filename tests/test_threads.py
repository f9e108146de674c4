"""The CPU thread policy: passive OpenMP waiting set before torch loads, `--threads` over `$OMP_NUM_THREADS`
over the available CPUs, and the count and load in the summaries."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from scanner.cli import main
from scanner.threads import ThreadPolicy, apply_threads, available_cpus, choose_threads


@pytest.fixture(autouse=True)
def keep_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_come_from_the_option_then_the_environment_then_the_cpus(monkeypatch):
    requested = random.randint(1, 8)
    monkeypatch.setenv("OMP_NUM_THREADS", str(requested + 1))
    assert (choose_threads(requested).threads, choose_threads(requested).source) == (requested, "--threads")
    assert (choose_threads().threads, choose_threads().source) == (requested + 1, "OMP_NUM_THREADS")
    for unusable in ("0", "two", "4,2", ""):  # OpenMP's nested lists and nonsense: every CPU instead
        monkeypatch.setenv("OMP_NUM_THREADS", unusable)
        assert (choose_threads().threads, choose_threads().source) == (available_cpus(), "CPUs available"), unusable
    assert available_cpus() == len(os.sched_getaffinity(0))


def test_apply_sets_torch_and_busy_means_half_the_cpus_taken():
    policy = apply_threads(1)
    assert torch.get_num_threads() == 1 and policy.threads == 1 and "1 thread (--threads)" in policy.describe()
    assert ThreadPolicy(2, "x", 2.0, 4).busy and not ThreadPolicy(2, "x", 1.9, 4).busy
    assert ThreadPolicy(2, "x", 1.234, 4).record() == {"threads": 2, "threads_from": "x", "load_average": 1.23, "cpus": 4}


def test_the_command_asks_openmp_to_wait_passively_unless_told_otherwise():
    probe = ("import os, sys; from scanner.cli import main; before = 'torch' in sys.modules; "
             "code = main(['scan', '/nonexistent', '--out', 'x.jsonl']); print(code, os.environ['OMP_WAIT_POLICY'], before)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    for preset, expected in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        run_env = env if preset is None else {**env, "OMP_WAIT_POLICY": preset}
        out = subprocess.run([sys.executable, "-c", probe], env=run_env, capture_output=True, text=True, check=True)
        assert out.stdout.split() == ["2", expected, "False"], out.stderr  # torch not yet imported by then


def test_scan_and_eval_use_and_report_the_threads(tmp_path, tiny_sd1, capsys):
    threads = random.choice([1, 2])
    inputs = tmp_path / "p.txt"
    inputs.write_text("a red fox\nthe city at night\n")
    said = f"{threads} thread{'s' * (threads > 1)} (--threads), load "
    # auto: a scan plan, whose session takes the threads (tests/test_plan.py); torch: torch's threads.
    for engine in ("auto", "torch"):
        out = tmp_path / f"{engine}.jsonl"
        code = main(["scan", str(inputs), "--model", str(tiny_sd1), "--out", str(out), "--threads", str(threads), "--engine", engine])
        assert code == 0
        captured = capsys.readouterr()
        assert said in captured.out and said in captured.err  # the summary line, and the loading line
    assert torch.get_num_threads() == threads
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"prompt": p, "label": i}) + "\n" for i, p in enumerate(["a cat", "a dog"])))
    assert main(["eval", "--labels", str(labels), "--model", str(tiny_sd1), "--json", str(tmp_path / "m.json"),
                 "--threads", str(threads)]) == 0
    runtime = json.loads((tmp_path / "m.json").read_text())["runtime"]
    assert runtime["threads"] == threads and runtime["threads_from"] == "--threads" and runtime["cpus"] == available_cpus()
