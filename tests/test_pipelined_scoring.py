"""The scoring loop's device path: all generations of a batch in one engine call, each batch submitted
before the one before it is read back (no sync per batch on CUDA), prompts in flight never computed twice."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from scanner.detect import DetectSettings, PendingScores, Scanner
from scanner.engines import TorchEngine
from scanner.model import load_model
from scanner.scan import run_scan

PROMPTS = [f"a {random.choice(['red', 'blue', 'green'])} photo of item {i}" for i in range(10)]


@pytest.fixture(scope="module")
def model(tiny_sd1):
    return load_model(tiny_sd1, device="cpu")


def test_all_generations_of_a_batch_in_one_engine_call(model, monkeypatch):
    seed, generations = random.randrange(2**31), random.randint(2, 4)
    settings = DetectSettings(generations=generations, seed=seed)
    calls: list[int] = []
    real = TorchEngine.conditional_norm

    def counting(self, latents, *args):
        calls.append(len(latents))
        return real(self, latents, *args)

    monkeypatch.setattr(TorchEngine, "conditional_norm", counting)
    got = Scanner(model, settings).score(PROMPTS[:5]).per_generation
    assert calls == [5 * generations]
    # The independent path: [uncond; cond] rows of every prompt and generation through the denoiser, nothing cached.
    expected = Scanner(model, settings, reuse_uncond=False).score(PROMPTS[:5]).per_generation
    np.testing.assert_allclose(got, expected, rtol=1e-5, err_msg=f"seed {seed}, {generations} generations")
    assert np.ptp(got, axis=1).min() > 0  # the generations differ: each row met its own latent


def test_a_scan_submits_each_batch_before_reading_the_one_before(tmp_path, model, monkeypatch):
    events: list[str] = []
    real_submit, real_result = Scanner.submit, PendingScores.result
    monkeypatch.setattr(Scanner, "submit", lambda self, prompts, *a: events.append("submit") or real_submit(self, prompts, *a))
    monkeypatch.setattr(PendingScores, "result", lambda self: events.append("read") or real_result(self))
    inp = tmp_path / "p.txt"
    inp.write_text("\n".join(PROMPTS) + "\n")
    scanner = Scanner(model, DetectSettings())
    run_scan(scanner, [inp], tmp_path / "out.jsonl", batch_size=3)
    assert events == ["submit", "submit", "read", "submit", "read", "submit", "read", "read"]  # batches of 3, 3, 3, 1
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    expected = Scanner(model, DetectSettings()).score(PROMPTS).score
    assert [r["prompt"] for r in rows] == PROMPTS
    np.testing.assert_allclose([r["score"] for r in rows], expected, rtol=1e-5)


def test_a_prompt_in_flight_is_taken_from_its_batch(model, monkeypatch):
    computed: list[int] = []
    real = Scanner._compute
    monkeypatch.setattr(Scanner, "_compute", lambda self, tokens, *a: computed.append(len(tokens.n_tokens)) or real(self, tokens, *a))
    scanner = Scanner(model, DetectSettings(), cache_size=2)
    first = scanner.submit(PROMPTS[:2])
    second = scanner.submit([PROMPTS[1], PROMPTS[2], PROMPTS[1]])  # before the first is read
    assert computed == [2, 1]
    a, b = first.result(), second.result()
    assert b.per_generation[0] == a.per_generation[1] and b.per_generation[2] == a.per_generation[1]
    # A cache of 2 prompts has dropped the first batch's first prompt, which that batch still read.
    assert list(scanner._cache) == [PROMPTS[1], PROMPTS[2]] and np.isfinite(a.per_generation).all()
    assert b.n_tokens[1] == len(model.tokenizer(PROMPTS[2], add_special_tokens=False).input_ids)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_submitting_batches_on_cuda_never_syncs(tiny_sd1):
    seed = random.randrange(2**31)
    settings = DetectSettings(generations=2, seed=seed)
    cuda = Scanner(load_model(tiny_sd1, device="cuda", dtype="fp32"), settings)
    cuda.family.unconditional()
    cuda.score(["warm-up"])  # the shared latents' unconditional row, cuBLAS handles
    batches = [PROMPTS[i : i + 4] for i in range(0, len(PROMPTS), 4)]
    tokens = [cuda.family.tokenize(b).pinned() for b in batches]
    torch.cuda.set_sync_debug_mode("error")
    try:
        pending = [cuda.submit(b, tokens=t) for b, t in zip(batches, tokens)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    got = np.concatenate([p.result().per_generation for p in pending])
    expected = Scanner(load_model(tiny_sd1, device="cpu"), settings).score(PROMPTS).per_generation
    np.testing.assert_allclose(got, expected, rtol=1e-4, err_msg=f"seed {seed}")
