"""Faithfulness: removing the top-ranked word lowers the score more than removing a random
word, for both methods, on the testbed's planted prompts. The figures are printed (-s)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from scanner.detect import DetectSettings, Scanner
from scanner.explain import drop_word, explain, faithfulness, split_words
from scanner.model import load_model


def test_figures_are_the_drops_they_claim(tiny_sd1):
    scanner = Scanner(load_model(tiny_sd1, device="cpu"), DetectSettings(seed=random.randrange(2**31)))
    prompts = ["a cat, sitting on a red sofa", "the quick brown fox", "x"]
    got = faithfulness(scanner, prompts, batch_size=2)
    fresh = Scanner(scanner.model, scanner.settings)
    top_grad, top_ablation, mean_drop, agree = [], [], [], []
    for prompt in prompts:
        words = split_words(scanner.family.tokenizer, prompt)
        full = fresh.score([prompt]).score[0]
        drops = full - fresh.score([drop_word(prompt, w) for w in words]).score
        (by_grad,) = explain(fresh, [prompt], "grad")
        g = int(np.argmax([w.score for w in by_grad.words]))
        top_grad.append(drops[g])
        top_ablation.append(drops.max())
        mean_drop.append(drops.mean())
        agree.append(g == int(np.argmax(drops)))
    assert got.prompts == 3
    assert got.drop_top_grad == pytest.approx(np.mean(top_grad), abs=1e-5)
    assert got.drop_top_ablation == pytest.approx(np.mean(top_ablation), abs=1e-5)
    assert got.drop_random_word == pytest.approx(np.mean(mean_drop), abs=1e-5)
    assert got.top_word_agreement == pytest.approx(np.mean(agree))


def test_top_word_matters_more_than_a_random_word_on_the_testbed(planted_testbed):
    model_dir, rows = planted_testbed
    planted = [row["prompt"] for row in rows if row["label"] == 1]
    scanner = Scanner(load_model(model_dir, device="cpu"), DetectSettings())
    got = faithfulness(scanner, planted)
    print(f"\nfaithfulness on {got.prompts} planted testbed prompts: {got}")
    assert got.drop_top_grad > got.drop_random_word
    assert got.drop_top_ablation > got.drop_random_word
