"""Hostile input rows: each is rejected with its reason (or the file refused in one line), none
crashes a scan or a sweep, and a resume finishes."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from cli_output import one_line_error

from scanner import scan as scan_module
from scanner.cli import main
from scanner.detect import DetectSettings, Scanner
from scanner.errors import MemscanError
from scanner.io import MAX_PROMPT_CHARS, InputRow, check_inputs, count_rows, read_prompts
from scanner.model import load_model
from scanner.service import MAX_CHARS
from scanner.sweep import SweepStore, run_sweep

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.fixture(scope="module")
def scanner(tiny_sd1):
    return Scanner(load_model(tiny_sd1, device="cpu"), DetectSettings())


def _rows(path, **options):
    return [(row.prompt, row.error) for row in read_prompts(check_inputs([path]), **options)]


def test_lone_surrogates_and_deep_nesting_are_rejected_rows(tmp_path, scanner):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join([json.dumps({"prompt": "a cat"}), '{"prompt": "\\ud800 x"}', DEEP, '{"prompt": ' + DEEP + "}",
                                json.dumps({"prompt": "a dog"})]) + "\n")
    assert _rows(jsonl) == [
        ("a cat", None), (None, "not valid UTF-8 (lone surrogate)"), (None, "invalid JSON (nested too deeply)"),
        (None, "invalid JSON (nested too deeply)"), ("a dog", None),
    ]
    summary = scan_module.run_scan(scanner, [jsonl], tmp_path / "o.parquet", commit_rows=1)
    assert (summary.rows, summary.rejected) == (2, 3)
    with SweepStore(tmp_path / "s.db") as store:
        swept = run_sweep(scanner, store, [jsonl])
    assert (swept.new, swept.rejected) == (2, 3)


def test_prompts_over_the_shared_limit_are_rejected_before_tokenizing(tmp_path, scanner, monkeypatch):
    assert MAX_CHARS == MAX_PROMPT_CHARS == 10_000
    txt = tmp_path / "p.txt"
    txt.write_text("\n".join(["a" * MAX_PROMPT_CHARS, "b" * (MAX_PROMPT_CHARS + 1), "a cat"]) + "\n")
    real = scanner.family.tokenize

    def tokenize(prompts):  # runs in the scan's reading process: a prompt over the limit fails the scan
        assert max(map(len, prompts)) <= MAX_PROMPT_CHARS
        return real(prompts)

    monkeypatch.setattr(scanner.family, "tokenize", tokenize)
    summary = scan_module.run_scan(scanner, [txt], tmp_path / "o.jsonl")
    assert (summary.rows, summary.rejected) == (2, 1)  # the prompt at the limit scored
    (reject,) = [json.loads(line) for line in (tmp_path / "o.rejects.jsonl").read_text().splitlines()]
    assert reject == {"id": f"{txt}:2", "reason": f"prompt of {MAX_PROMPT_CHARS + 1} characters, over the limit of 10000"}


def test_a_line_over_the_line_limit_is_skipped_without_being_held(tmp_path, monkeypatch):
    from scanner.io import readers

    monkeypatch.setattr(readers, "MAX_LINE_BYTES", 64)
    txt = tmp_path / "p.txt"
    txt.write_text("a cat\n" + "x" * 1000 + "\na dog\n")
    assert _rows(txt) == [("a cat", None), (None, readers.LONG_LINE), ("a dog", None)]
    assert count_rows(txt) == 3


def test_a_utf8_bom_is_dropped_in_every_text_format(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "p.txt").write_bytes(bom + b"a cat\na dog\n")
    (tmp_path / "p.jsonl").write_bytes(bom + b'{"prompt": "a cat"}\n')
    (tmp_path / "p.csv").write_bytes(bom + b"prompt,id\na cat,1\n")
    assert _rows(tmp_path / "p.txt") == [("a cat", None), ("a dog", None)]
    assert _rows(tmp_path / "p.jsonl") == [("a cat", None)]
    assert _rows(tmp_path / "p.csv") == [("a cat", None)]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32"])
@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv"])
def test_utf16_text_is_refused_in_one_line(tmp_path, encoding, suffix):
    path = tmp_path / f"p{suffix}"
    path.write_text('prompt\n"a cat"\n' if suffix == ".csv" else '{"prompt": "a cat"}\n', encoding=encoding)
    with pytest.raises(MemscanError, match="UTF-16 or UTF-32 text; convert it to UTF-8") as error:
        check_inputs([path])
    assert "\n" not in str(error.value)


def test_an_unclosed_csv_quote_is_reported_on_its_row(tmp_path):
    csv_path = tmp_path / "p.csv"
    csv_path.write_text('prompt\na cat\n"a dog, running\na bird\na fish\n')
    assert _rows(csv_path) == [("a cat", None), (None, "unclosed quote: this row swallowed every line after it")]
    fine = tmp_path / "q.csv"
    fine.write_text('prompt\n"two\nlines"\n"a ""quoted"" word"\n')
    assert _rows(fine) == [("two\nlines", None), ('a "quoted" word', None)]


def test_scan_output_with_bom_inputs_scores_the_prompt_without_it(tmp_path, scanner):
    txt = tmp_path / "p.txt"
    txt.write_bytes(b"\xef\xbb\xbfa cat\n")
    scan_module.run_scan(scanner, [txt], tmp_path / "o.parquet")
    (row,) = pq.read_table(tmp_path / "o.parquet").to_pylist()
    assert row["prompt"] == "a cat" and row["score"] == pytest.approx(float(scanner.score(["a cat"]).score[0]), rel=1e-5)


def test_truncated_safetensors_and_pickle_only_weights_are_refused_in_one_line(tmp_path, tiny_sd1, capsys, monkeypatch):
    import shutil

    from scanner.io.weights import check_weights

    check_weights(tiny_sd1)  # the intact folder passes
    model = tmp_path / "model"
    shutil.copytree(tiny_sd1, model)
    weights = model / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(MemscanError, match="truncated safetensors file") as error:
        check_weights(model)
    assert str(weights) in str(error.value) and "\n" not in str(error.value)
    weights.write_bytes(b"\x01")
    with pytest.raises(MemscanError, match="not a readable safetensors file"):
        check_weights(model)
    weights.unlink()
    (model / "text_encoder" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(MemscanError, match="only as pickles"):
        check_weights(model)
    (tmp_path / "p.txt").write_text("a prompt\n")
    monkeypatch.setattr("scanner.detect.ScannerSpec.load", lambda spec: pytest.fail("the model was loaded"))
    code = main(["scan", str(tmp_path / "p.txt"), "--model", str(model), "--out", str(tmp_path / "o.parquet")])
    assert "only as pickles" in one_line_error(capsys, code)  # the command refuses before the slow load


@pytest.mark.parametrize("chunk", [1, 5, 1024])
def test_groups_tokenized_in_chunks_get_their_own_rows(scanner, chunk):
    """Chunks across groups (rejected rows and all-rejected groups among them) hand each group its prompts' ids."""
    rows = [InputRow(f"p:{i}", i, None, "empty") if i % 4 == 3 else InputRow(f"p:{i}", i, f"a photo of item {i}")
            for i in range(23)]
    groups = [rows[0:3], rows[3:4], rows[4:11], rows[11:12], rows[12:23]]
    batches = list(scan_module.tokenized_batches(scanner, groups, chunk=chunk))
    assert [group for group, _ in batches] == groups
    for group, tokens in batches:
        prompts = [r.prompt for r in group if r.error is None]
        if not prompts:
            assert tokens is None
            continue
        expected = scanner.family.tokenize(prompts)
        assert np.array_equal(tokens.input_ids, expected.input_ids)
        assert (tokens.n_tokens, tokens.truncated) == (expected.n_tokens, expected.truncated)
