"""`memscan bench`: modes agree on scores, the JSON has the promised fields, the no-op scan runs."""

from __future__ import annotations

import json
import random
import time

import numpy as np
import pytest

from scanner import benchmark
from scanner.cli import main
from scanner.detect import DetectSettings, Scanner
from scanner.model import load_model


@pytest.fixture(scope="module")
def model(tiny_sd1):
    return load_model(tiny_sd1, device="cpu")


def test_modes_score_alike_and_ratios_are_against_the_reference(model):
    prompts = benchmark.sample_prompts(5, offset=int(np.random.default_rng().integers(0, 10_000)))
    results = benchmark.compare_modes(model, prompts, batch_size=2, engines=["onnx", "tensorrt"])
    names = [r.name for r in results]
    assert names[:4] == [
        "(a) reference loop, batch of 2",
        "(b) scanner, batched, eager",
        "(c) + cached uncond (torch)",
        "(d) + cached uncond (onnx)",
    ]
    assert not any("tensorrt" in n for n in names) or results[-1].prompts_per_s > 0  # skipped where unavailable
    assert results[0].ratio_vs_reference == 1.0
    expected = Scanner(model, DetectSettings()).score(prompts).score
    for result in results:
        np.testing.assert_allclose(result.scores, expected, rtol=1e-4, err_msg=result.name)
        assert result.max_rel_diff < 1e-4
        # Three batches (2, 2, 1 prompts): the median batch, and the median of batch-by-batch ratios to (a).
        assert len(result.batch_prompts_per_s) == 3
        assert result.prompts_per_s == np.median(result.batch_prompts_per_s)
        ratios = result.batch_prompts_per_s / results[0].batch_prompts_per_s
        assert result.ratio_vs_reference == pytest.approx(np.median(ratios))


def test_a_mode_reports_its_median_batch_and_the_spread():
    rates = np.random.default_rng().uniform(1, 100, size=5)
    result = benchmark.ModeResult("m", rates, np.zeros(5))
    assert result.prompts_per_s == pytest.approx(np.sort(rates)[2])
    assert result.spread == pytest.approx((rates.max() - rates.min()) / np.sort(rates)[2])
    row = result.to_dict()
    assert (row["prompts_per_s_min"], row["prompts_per_s_max"], row["batches"]) == (rates.min(), rates.max(), 5)
    assert "spread" in benchmark.format_table([result]).splitlines()[0]


def test_a_fast_mode_scores_its_batch_again_until_its_turn_is_long_enough():
    calls = {"fast": 0, "slow": 0}

    def mode(name, seconds):
        def score(batch):
            calls[name] += 1
            time.sleep(seconds)
            return np.ones(len(batch))
        return score

    results = benchmark.interleaved_throughput({"slow": mode("slow", 0.03), "fast": mode("fast", 0.0)},
                                               [str(i) for i in range(6)], ["w"], batch_size=3, min_turn_s=0.02)
    assert calls["slow"] == 1 + 2  # the warm-up, then once a batch: its turn is long enough
    assert calls["fast"] > 1 + 2 * 2  # repeated within each of its turns
    assert [len(r.scores) for r in results] == [6, 6]  # one batch's scores per turn, however many repeats


def test_reference_loop_is_the_pipeline_batch_of_two(model):
    seed = random.randrange(2**31)
    scanner = Scanner(model, DetectSettings(seed=seed))
    t0 = scanner.timesteps[0]
    loop = benchmark.ReferenceLoop(model, scanner.shared_latents(), t0)
    prompts = ["a castle at night", "x"]
    np.testing.assert_allclose(loop(prompts), scanner.score(prompts).score, rtol=1e-4, err_msg=f"seed {seed}")


def test_cli_bench_writes_the_json_list(tiny_sd1, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--model", str(tiny_sd1), "--prompts", "3", "--batch-size", "2", "--engines", "", "--json", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())
    assert [set(r) >= {"name", "prompts_per_s", "ratio_vs_reference", "max_rel_diff_vs_reference"} for r in rows] == [True] * 3
    assert rows[0]["name"].startswith("(a) reference loop") and rows[0]["max_rel_diff_vs_reference"] == 0.0
    for row in rows:
        assert row["prompts_per_s"] > 0, row["name"]
        assert row["prompts_per_s_min"] <= row["prompts_per_s"] <= row["prompts_per_s_max"] and row["batches"] == 2
        assert 0 <= row["max_rel_diff_vs_reference"] < 1e-4, row["name"]
    assert "(c) + cached uncond (torch)" in capsys.readouterr().out


def test_orchestrator_scans_every_prompt_with_noop_scoring(model, tmp_path):
    result = benchmark.orchestrator_throughput(model, 700, batch_size=64, folder=tmp_path)
    assert result.prompts == 700 and result.prompts_per_s > 0 and result.prompts_per_cpu_s > 0
    assert 0 < result.rss_tenth_mb <= result.peak_rss_mb
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "scan.parquet")
    assert table.num_rows == 700 and set(table.column("score").to_pylist()) == {0.0}
    assert table.column("prompt").to_pylist()[:2] == benchmark.sample_prompts(2)
    assert table.column("n_tokens").to_pylist()[:2] == model.family.tokenize(benchmark.sample_prompts(2)).n_tokens
