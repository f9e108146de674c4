"""`memscan scan --engine ray` against the single-process scan, on a local Ray of 2 CPU workers.

The reference is always a single-process `memscan scan` of the same inputs and model (the
bundled testbed, whatever its weights): same ids, scores within 1e-5, same rejects.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_output import one_line_error

from scanner import scan as scan_module
from scanner.cli import main
from scanner.detect import DetectSettings, Scanner, ScannerSpec
from scanner.errors import MemscanError
from scanner.io import check_inputs, count_rows, read_prompts
from scanner.io.readers import CSV_FIELD_LIMIT
from scanner.testbed import default_model_path


@pytest.fixture(scope="module")
def local_ray():
    """A new small local Ray (not one `ray start` left running): 2 CPUs, 200 MB object store, quiet workers."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _inputs(folder):
    """Every format, a bad row of each kind the readers reject, and two files behind a glob."""
    txt = folder / "p.txt"
    txt.write_bytes(b"a red cube on a table\n\nbad \xff bytes\na blue ball\nThe No Limits Business Woman Podcast\n")
    logs = folder / "logs"
    logs.mkdir()
    (logs / "a.jsonl").write_text(
        "\n".join(
            [json.dumps({"caption": "a green cone"}), json.dumps({"caption": 7}), json.dumps({"other": "x"}), "{broken", json.dumps(["x"])]
        )
        + "\n"
    )
    (logs / "b.jsonl").write_text("".join(json.dumps({"prompt": f"a watercolor of fox number {i}"}) + "\n" for i in range(12)))
    csv_path = folder / "p.csv"
    csv_path.write_bytes(b'id,prompt\n1,"a cat, sitting"\n2,\n3,caf\xe9 au lait\n4,"two\nlines"\n')
    parquet = folder / "p.parquet"
    pq.write_table(pa.table({"text": ["a dog", None, "a bird", "   "] + [f"an oil painting of a ship {i}" for i in range(8)]}), parquet)
    expected_ids = (
        [f"{txt}:{n}" for n in range(1, 6)]
        + [f"{logs / 'a.jsonl'}:{n}" for n in range(1, 6)]
        + [f"{logs / 'b.jsonl'}:{n}" for n in range(1, 13)]
        + [f"{csv_path}:{n}" for n in range(1, 5)]
        + [f"{parquet}:{n}" for n in range(1, 13)]
    )
    return [str(txt), str(logs / "*.jsonl"), str(csv_path), str(parquet)], expected_ids


def _rejects(out):
    return [json.loads(line) for line in out.with_name(out.stem + ".rejects.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow  # 2 Ray workers, each importing torch and loading the model: a minute on 2 cores
def test_ray_scan_matches_the_single_process_scan(tmp_path, local_ray, capsys):
    inputs, expected_ids = _inputs(tmp_path)
    single, on_ray = tmp_path / "single.parquet", tmp_path / "ray.parquet"
    assert main(["scan", *inputs, "--out", str(single)]) == 0
    reference = pq.read_table(single).to_pylist()
    scores = sorted(r["score"] for r in reference)
    threshold = (scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2  # half flagged, between two scores
    code = main(
        ["scan", *inputs, "--out", str(on_ray), "--engine", "ray", "--workers", "2", "--batch-size", "4", "--threshold", str(threshold)]
    )
    assert code == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"scored {len(reference)}, flagged ")
    assert pq.read_schema(on_ray) == pq.read_schema(single)
    rows = pq.read_table(on_ray).to_pylist()
    assert [r["id"] for r in rows] == [r["id"] for r in reference]
    for row, ref in zip(rows, reference):
        assert row["prompt"] == ref["prompt"]
        assert row["score"] == pytest.approx(ref["score"], rel=1e-5, abs=1e-5)
        assert row["scores"] == pytest.approx(ref["scores"], rel=1e-5, abs=1e-5)
        assert (row["n_tokens"], row["truncated"], row["model"], row["settings"]) == (
            ref["n_tokens"],
            ref["truncated"],
            ref["model"],
            ref["settings"],
        )
        assert row["flagged"] is (ref["score"] >= threshold)
    assert any(r["flagged"] for r in rows) and not all(r["flagged"] for r in rows)
    rejects = _rejects(on_ray)
    assert rejects == _rejects(single)
    assert {r["reason"] for r in rejects} >= {"empty prompt", "not UTF-8", "missing value", "not a JSON object"}
    every_row = [r["id"] for r in rows] + [r["id"] for r in rejects]
    assert sorted(every_row) == sorted(expected_ids)  # each input row exactly once
    assert not on_ray.with_name(on_ray.name + ".parts").exists()


@pytest.mark.slow  # two more Ray scans; the default run keeps the 2-worker comparison
def test_reference_noise_seeds_rows_by_their_position_over_all_inputs(tmp_path, local_ray, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths: the workers run in another folder
    first, second = Path("a.txt"), Path("b.jsonl")
    first.write_text("".join(f"a photo of item {i}\n" for i in range(5)))
    second.write_text("".join(json.dumps({"prompt": f"a photo of item {i}"}) + "\n" for i in range(5)))
    single, on_ray = Path("single.jsonl"), Path("ray.jsonl")
    options = ["--noise", "reference", "--generations", "2"]
    assert main(["scan", str(first), str(second), *options, "--out", str(single)]) == 0
    assert main(["scan", str(first), str(second), *options, "--out", str(on_ray), "--engine", "ray", "--workers", "1", "--batch-size", "3"]) == 0
    reference, rows = ([json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] for out in (single, on_ray))
    assert [r["id"] for r in rows] == [r["id"] for r in reference] == [f"a.txt:{n}" for n in range(1, 6)] + [f"b.jsonl:{n}" for n in range(1, 6)]
    flat = [s for r in rows for s in r["scores"]]
    assert len(flat) == 20 and flat == pytest.approx([s for r in reference for s in r["scores"]], rel=1e-5, abs=1e-5)
    # The same prompt at another position has other latents, so another score.
    assert rows[0]["prompt"] == rows[5]["prompt"] and rows[0]["score"] != pytest.approx(rows[5]["score"], rel=1e-6)


@pytest.mark.slow  # a library scan, a crash and a Ray scan
def test_ray_scan_resumes_a_crashed_single_process_scan(tmp_path, local_ray, monkeypatch):
    inputs, expected_ids = _inputs(tmp_path)
    out = tmp_path / "scan.parquet"
    scanner = ScannerSpec(str(default_model_path()), DetectSettings(), device="cpu").load()
    real_score, calls = Scanner.score, {"n": 0}

    def crash_on_third_batch(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real_score(self, *args, **kwargs)

    monkeypatch.setattr(Scanner, "score", crash_on_third_batch)
    with pytest.raises(RuntimeError):
        scan_module.run_scan(scanner, inputs, out, batch_size=4, commit_rows=4)
    monkeypatch.setattr(Scanner, "score", real_score)
    committed = len(list(out.with_name(out.name + ".parts").glob("*.parquet")))
    assert committed >= 2
    # --no-calibration: the crashed library scan had no threshold, and the threshold is part of the run's key.
    argv = ["scan", *inputs, "--out", str(out), "--engine", "ray", "--workers", "1", "--batch-size", "4", "--no-calibration"]
    assert main(argv) == 0
    rows = pq.read_table(out).to_pylist()
    rejects = _rejects(out)
    assert sorted([r["id"] for r in rows] + [r["id"] for r in rejects]) == sorted(expected_ids)
    expected = scanner.score([r["prompt"] for r in rows]).score
    assert [r["score"] for r in rows] == pytest.approx(expected.tolist(), rel=1e-5, abs=1e-5)


def test_usage_errors(tmp_path, local_ray, capsys):
    inp = tmp_path / "p.txt"
    inp.write_text("a cat\n")
    out = ["--out", str(tmp_path / "o.parquet")]
    assert "needs --engine ray" in one_line_error(capsys, main(["scan", str(inp), *out, "--workers", "2"]))
    err = one_line_error(capsys, main(["scan", str(inp), *out, "--engine", "ray", "--gpus-per-worker", "1"]))
    assert "has no GPU" in err
    err = one_line_error(capsys, main(["scan", str(inp), *out, "--engine", "ray", "--worker-engine", "ray"]))
    assert "unknown engine 'ray'" in err
    assert "no file matches" in one_line_error(capsys, main(["scan", str(tmp_path / "*.jsonl"), *out, "--engine", "ray"]))


def test_without_ray_installed_says_how_to_install(tmp_path, monkeypatch, capsys):
    inp = tmp_path / "p.txt"
    inp.write_text("a cat\n")
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    err = one_line_error(capsys, main(["scan", str(inp), "--out", str(tmp_path / "o.parquet"), "--engine", "ray"]))
    assert "pip install 'memscan[ray]'" in err


def test_unreachable_address_fails_fast_in_one_line(tmp_path):
    inp = tmp_path / "p.txt"
    inp.write_text("a cat\n")
    cmd = [sys.executable, "-m", "scanner.cli", "scan", str(inp), "--out", str(tmp_path / "o.parquet")]
    done = subprocess.run([*cmd, "--engine", "ray", "--ray-address", "127.0.0.1:1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["memscan: error: cannot reach Ray at '127.0.0.1:1': Connection refused"]


def test_row_counts_and_globs_agree_with_the_readers(tmp_path):
    """Ray read tasks number rows from these counts: they must match what the readers yield."""
    inputs, expected_ids = _inputs(tmp_path)
    (tmp_path / "no_newline.txt").write_bytes(b"one\r\ntwo\n\nthree")
    (tmp_path / "empty.jsonl").write_bytes(b"")
    paths = check_inputs([*inputs, str(tmp_path / "no_newline.txt"), str(tmp_path / "empty.jsonl")])
    assert [p.name for p in paths] == ["p.txt", "a.jsonl", "b.jsonl", "p.csv", "p.parquet", "no_newline.txt", "empty.jsonl"]
    for path in paths:
        assert count_rows(path) == len(list(read_prompts([path]))), path
    assert [r.id for r in read_prompts(paths[:5])] == expected_ids
    assert [r.index for r in read_prompts(paths[1:2], first_index=7)] == list(range(7, 12))
    with pytest.raises(MemscanError, match="no file matches"):
        check_inputs([str(tmp_path / "*.csvx")])


def _random_words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choices(["a", "red", "cube", "on", "the", "table", "café", "harbour", "at", "dusk"], k=count))


def test_a_runaway_csv_quote_stops_the_file_after_the_good_rows(tmp_path, capsys):
    """Prompts over Python's 128 KiB field default are read; a field over CSV_FIELD_LIMIT exits 2 with one line."""
    rng = random.Random()
    short, long = _random_words(rng, 6), _random_words(rng, 40_000)
    assert len(long) > 131_072
    # Row 3 opens a quote that never closes: every later line becomes part of its field.
    later = "".join(f"{4 + i},{_random_words(rng, 8)}\n" for i in range(CSV_FIELD_LIMIT // 40))
    assert len(later) > CSV_FIELD_LIMIT
    csv_path = tmp_path / "p.csv"
    csv_path.write_text(f'id,prompt\n1,{short}\n2,"{long}"\n3,"an unclosed quote\n{later}', encoding="utf-8")

    assert check_inputs([csv_path]) == [csv_path]  # only the header is read up front
    rows = read_prompts([csv_path], max_chars=len(long))
    assert [next(rows).prompt, next(rows).prompt] == [short, long]
    message = f"{csv_path}: unreadable after row 2: field larger than field limit ({CSV_FIELD_LIMIT})"
    with pytest.raises(MemscanError) as error:
        next(rows)
    assert str(error.value) == message
    with pytest.raises(MemscanError) as error:
        count_rows(csv_path)
    assert str(error.value) == message
    err = one_line_error(capsys, main(["scan", str(csv_path), "--out", str(tmp_path / "o.jsonl")]))
    assert err == f"memscan: error: {message}"


def test_a_corrupt_parquet_row_group_stops_the_file_after_the_good_ones(tmp_path):
    rng = random.Random()
    prompts = [_random_words(rng, rng.randint(3, 12)) for _ in range(60)]
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": prompts}), parquet, row_group_size=20)
    chunk = pq.ParquetFile(parquet).metadata.row_group(1).column(0)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data = parquet.read_bytes()
    parquet.write_bytes(data[: start + 10] + data[start + 60 :])  # 50 bytes cut from group 2's first page header

    assert check_inputs([parquet]) == [parquet]  # the footer and schema are intact
    assert count_rows(parquet) == 60  # as the footer says
    rows = read_prompts([parquet])
    assert [next(rows).prompt for _ in range(20)] == prompts[:20]
    with pytest.raises(MemscanError, match=rf"^{re.escape(str(parquet))}: unreadable after row 20: \S") as error:
        next(rows)
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_a_worker_error_ends_the_scan_with_its_one_line_reason(tmp_path, local_ray, capsys):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed: the tensorrt engine may start on the workers")
    inp = tmp_path / "p.txt"
    inp.write_text("a cat\n")
    code = main(["scan", str(inp), "--out", str(tmp_path / "o.parquet"), "--engine", "ray", "--workers", "1", "--worker-engine", "tensorrt"])
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("memscan: error: a Ray worker failed: tensorrt engine needs TensorRT")
    assert code == 2
