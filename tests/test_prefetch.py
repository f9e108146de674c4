"""A scan's reading process (`produced_ahead`): items in order, errors and deaths raised, nothing left running."""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from scanner import prefetch as prefetch_module
from scanner import scan as scan_module
from scanner.benchmark import write_prompts
from scanner.errors import MemscanError
from scanner.prefetch import produced_ahead

pytestmark = pytest.mark.skipif(not prefetch_module.can_fork(), reason="the reading process forks (Linux only)")


def numbered(arrays: list[np.ndarray], then=None):
    """Each array with the pid that yielded it; then `then()` (raise, exit)."""
    for a in arrays:
        yield os.getpid(), a
    if then is not None:
        then()


def test_items_come_back_in_order_from_another_process():
    arrays = [np.random.default_rng().standard_normal(int(n)) for n in np.random.default_rng().integers(1, 5000, 50)]
    got = list(produced_ahead(numbered(arrays)))
    assert len(got) == len(arrays) and all(np.array_equal(a, b) for (_, a), b in zip(got, arrays))
    assert {pid for pid, _ in got} != {os.getpid()} and len({pid for pid, _ in got}) == 1
    assert multiprocessing.active_children() == []


def test_a_users_error_in_the_child_is_raised_after_the_items_before_it():
    def fail():
        raise MemscanError("p.jsonl: unreadable after row 3: I/O error")

    got = []
    with pytest.raises(MemscanError, match="unreadable after row 3"):
        for item in produced_ahead(numbered([np.ones(2)] * 3, fail)):
            got.append(item)
    assert len(got) == 3
    assert multiprocessing.active_children() == []


def test_a_bug_in_the_child_arrives_with_its_traceback():
    def fail():
        raise ZeroDivisionError("division by zero in the reader")

    with pytest.raises(RuntimeError, match="(?s)in the prompt-reading process.*in fail.*ZeroDivisionError: division by zero"):
        list(produced_ahead(numbered([], fail)))


def test_a_child_that_dies_is_an_error_not_a_hang():
    with pytest.raises(MemscanError, match="stopped unexpectedly \\(exit code 3\\)"):
        list(produced_ahead(numbered([np.ones(1)], lambda: os._exit(3))))


def test_stopping_early_ends_the_child():
    def endless():
        while True:
            yield np.ones(1000)

    items = produced_ahead(endless())
    next(items)
    assert len(multiprocessing.active_children()) == 1
    items.close()
    assert multiprocessing.active_children() == []


def test_a_scan_read_in_a_child_writes_what_one_read_in_a_thread_writes(tmp_path, monkeypatch, tiny_sd1):
    from scanner.detect import DetectSettings, Scanner
    from scanner.model import load_model

    model = load_model(tiny_sd1, device="cpu")
    inputs = write_prompts(tmp_path / "p.txt", int(np.random.default_rng().integers(40, 90)))
    with inputs.open("a", encoding="utf-8") as f:
        f.write("\nnaïve café 東京 <|endoftext|> a|b\n")  # an empty line (a reject) and the Rust tokenizer's prompts
    # A scanner each: the second must not take its scores from the first one's cache.
    forked = scan_module.run_scan(Scanner(model, DetectSettings()), [inputs], tmp_path / "forked.jsonl", batch_size=8)
    monkeypatch.setattr(prefetch_module, "can_fork", lambda: False)
    threaded = scan_module.run_scan(Scanner(model, DetectSettings()), [inputs], tmp_path / "threaded.jsonl", batch_size=8)
    assert (forked.rows, forked.rejected) == (threaded.rows, threaded.rejected) and forked.rejected == 1
    rows = [[json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()] for name in ("forked", "threaded")]
    assert rows[0] == rows[1]


def test_the_reading_process_holds_none_of_the_scans_locks(tmp_path):
    """A parent killed mid-scan must leave its output free for the resume at once, not when its child ends."""
    from scanner.io.lock import lock_file

    lock = lock_file(tmp_path / "out.lock", 1.0, "busy")

    def slow():
        yield 1
        time.sleep(30)
        yield 2

    items = produced_ahead(slow())
    assert next(items) == 1  # the child is running, and sleeps
    lock.close()
    lock_file(tmp_path / "out.lock", 0.0, "still held by the reading process").close()
    items.close()


@pytest.fixture
def no_hang():
    """Fail, instead of hanging the suite, when the code under test blocks for good."""
    def timed_out(signum, frame):
        raise TimeoutError("blocked for 60 s")

    previous = signal.signal(signal.SIGALRM, timed_out)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_a_child_killed_while_sending_is_an_error_not_a_hang(no_hang):
    """An item far larger than the pipe's buffer: the child is killed while it is half written."""
    items = produced_ahead(np.random.default_rng().standard_normal(1 << 18) for _ in range(3))  # 2 MB each
    next(items)
    time.sleep(0.5)  # the child is now blocked part way through the second item
    (child,) = multiprocessing.active_children()
    os.kill(child.pid, signal.SIGKILL)
    with pytest.raises(MemscanError, match="stopped unexpectedly \\(exit code -9\\)"):
        list(items)


def test_the_child_leaves_when_its_parent_is_killed(tmp_path, no_hang):
    script = """
import os, sys, time
from scanner.prefetch import produced_ahead

def endless():
    sys.stdout.write(f"{os.getpid()}\\n"); sys.stdout.flush()
    while True:
        yield bytes(1 << 20)  # more than the pipe holds: the child waits on its write

items = produced_ahead(endless())
next(items)
time.sleep(60)
"""
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    for _ in range(100):  # it notices at its next write
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)
    pytest.fail("the reading process outlived its parent by 10 s")


class Finalized:
    """Garbage in a reference cycle whose finalizer records the process that ran it."""

    def __init__(self, marks: str):
        self.marks, self.cycle = marks, self

    def __del__(self):
        with open(self.marks, "a") as f:
            f.write(f"{os.getpid()}\n")


def test_the_child_never_collects_what_it_inherited(tmp_path):
    """Inherited garbage freed in the child ran its native destructor there (an ONNX Runtime session's hung)."""
    marks = tmp_path / "finalized"
    gc.disable()
    try:
        Finalized(str(marks))  # unreachable, left for the collector

        def collect():
            gc.collect()
            yield os.getpid()

        (child,) = produced_ahead(collect())
    finally:
        gc.enable()
    gc.collect()
    assert marks.read_text().split() == [str(os.getpid())]  # freed here, never in the child
    assert child != os.getpid()
