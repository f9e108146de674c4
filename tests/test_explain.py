"""Explanations: gradient significance against an independent autograd computation on
diffusers' own pipeline trajectory (float64), word merging, and leave-one-word-out."""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pytest
import torch

from scanner.detect import DetectSettings, Scanner
from scanner.errors import MemscanError
from scanner.explain import drop_word, explain, split_words, token_significance
from scanner.model import load_model

PROMPT = "A photo of an Astronaut, riding a horse!"
STEPS = 10


@pytest.fixture(scope="module")
def model_dir(request, tiny_sd1, tiny_sd2):
    return {"sd1": tiny_sd1, "sd2": tiny_sd2}[request.param]


@pytest.fixture(scope="module")
def model64(model_dir):
    """The tiny model in float64, so the two gradient computations agree to rounding."""
    model = load_model(model_dir, device="cpu")
    model.denoiser.double()
    model.family.text_encoders["text_encoder"].double()
    return dataclasses.replace(model, dtype=torch.float64)


@pytest.fixture(scope="module")
def pipe64(model_dir):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.float64)


def _pipeline_significance(pipe, prompt: str, latents: torch.Tensor, window: tuple[int, int]) -> np.ndarray:
    """`[77]` significance from the pipeline's own CFG trajectory, differentiated here directly."""
    captured = []
    hook = pipe.unet.register_forward_hook(
        lambda module, args, kwargs, out: captured.append((args[0].detach(), args[1])), with_kwargs=True
    )

    def stop_after_window(pipeline, step, timestep, callback_kwargs):
        if step + 1 >= window[1]:
            pipeline._interrupt = True
        return callback_kwargs

    n = len(latents)
    try:
        pipe(prompt, num_images_per_prompt=n, num_inference_steps=STEPS, guidance_scale=7.5, latents=latents,
             output_type="latent", callback_on_step_end=stop_after_window)
    finally:
        hook.remove()

    def embed(text: str) -> torch.Tensor:
        ids = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return pipe.text_encoder(ids)[0].detach()

    empty, prompt_embedding = embed(""), embed(prompt)
    alphas = pipe.scheduler.alphas_cumprod.double()
    total = torch.zeros(77, dtype=torch.float64)
    for x_in, t in captured[window[0] : window[1]]:
        x = x_in[:n]  # the pipeline batches [uncond rows; cond rows] on the same latents
        e = prompt_embedding.clone().requires_grad_(True)
        uncond = pipe.unet(x, t, encoder_hidden_states=empty.expand(n, -1, -1)).sample
        cond = pipe.unet(x, t, encoder_hidden_states=e.expand(n, -1, -1)).sample
        scale = math.sqrt(alphas[int(t)]) if pipe.scheduler.config.prediction_type == "v_prediction" else 1.0
        loss = sum((cond[g] - uncond[g]).norm() for g in range(n)) * scale
        loss.backward()
        total += e.grad[0].norm(dim=-1)
    return (total / (window[1] - window[0])).numpy()


# The multi-step window checks the guidance order on the epsilon model; the first step
# checks the v-prediction scale (each case costs seconds on two shared cores).
@pytest.mark.parametrize("model_dir, window, generations", [("sd1", (1, 3), 2), ("sd2", (0, 1), 1)], indirect=["model_dir"])
def test_gradient_significance_matches_independent_autograd(model64, pipe64, window, generations):
    seed = random.randrange(2**31)
    settings = DetectSettings(num_inference_steps=STEPS, start_step=window[0], end_step=window[1],
                              generations=generations, seed=seed)
    scanner = Scanner(model64, settings)
    got = token_significance(scanner, [PROMPT, "x"])
    expected = _pipeline_significance(pipe64, PROMPT, scanner.shared_latents(), window)
    np.testing.assert_allclose(got[0], expected, rtol=1e-5, atol=1e-12, err_msg=f"seed {seed}")
    assert got[0].std() > 0  # positions differ: a constant would pass a loose check


def test_words_keep_their_spans(tiny_sd1):
    tokenizer = load_model(tiny_sd1, device="cpu").family.tokenizer
    words = split_words(tokenizer, "  Unbelievablyxyzzy café, don't!")
    assert [w.text for w in words] == ["Unbelievablyxyzzy", "café", ",", "don", "'t", "!"]
    assert words[0].positions == (1, 2, 3, 4, 5)  # five BPE pieces, after BOS at position 0
    assert words[1].positions == (6,)
    prompt = "  Unbelievablyxyzzy café, don't!"
    assert all(prompt[w.start : w.end] == w.text for w in words)
    assert drop_word(prompt, words[1]) == "  Unbelievablyxyzzy , don't!"  # the rest is kept as typed
    assert drop_word(prompt, words[0]) == "café, don't!"


def test_truncated_prompt_has_only_the_seen_words(tiny_sd1):
    tokenizer = load_model(tiny_sd1, device="cpu").family.tokenizer
    prompt = "a " + " ".join(["unbelievablyxyzzy"] * 20)  # 1 + 100 tokens, 75 kept
    words = split_words(tokenizer, prompt)
    assert len(words) == 16 and words[-1].positions == (72, 73, 74, 75)
    assert words[-1].text == "unbelievablyxy"  # cut mid-word: the kept pieces only


@pytest.fixture(scope="module")
def scanner32(tiny_sd1):
    return Scanner(load_model(tiny_sd1, device="cpu"), DetectSettings(generations=2, seed=random.randrange(2**31)))


def test_gradient_explanation_sums_tokens_into_words(scanner32):
    (explanation,) = explain(scanner32, [PROMPT], "grad")
    significance = token_significance(scanner32, [PROMPT])[0]
    words = split_words(scanner32.family.tokenizer, PROMPT)
    assert [w.word for w in explanation.words] == [w.text for w in words]
    for row, word in zip(explanation.words, words):
        assert row.score == pytest.approx(significance[list(word.positions)].sum(), rel=1e-6)
    assert sum(w.share for w in explanation.words) == pytest.approx(1.0)
    # BOS, EOS and padding carry gradient too; they must not be part of the total.
    assert sum(w.score for w in explanation.words) < significance.sum()
    assert explanation.score == pytest.approx(scanner32.score([PROMPT]).score[0])


def test_ablation_is_score_minus_score_without_the_word(scanner32):
    (explanation,) = explain(scanner32, [PROMPT], "ablation")
    fresh = Scanner(scanner32.model, scanner32.settings)  # no cache shared with the explanation
    words = split_words(scanner32.family.tokenizer, PROMPT)
    without = fresh.score([drop_word(PROMPT, w) for w in words]).score
    full = fresh.score([PROMPT]).score[0]
    for row, score_without in zip(explanation.words, without):
        assert row.score_without == pytest.approx(score_without, rel=1e-5)
        assert row.score == pytest.approx(full - score_without, abs=1e-5)
    positive = [w for w in explanation.words if w.score > 0]
    assert sum(w.share for w in positive) == pytest.approx(1.0)
    assert all(w.share == 0 for w in explanation.words if w.score <= 0)


def test_empty_prompt_and_bad_method(scanner32):
    (explanation,) = explain(scanner32, [""], "ablation")
    assert explanation.words == [] and explanation.score == pytest.approx(0, abs=1e-4)  # "" is e_0 itself
    with pytest.raises(MemscanError, match="method"):
        explain(scanner32, [PROMPT], "saliency")
    reference = Scanner(scanner32.model, dataclasses.replace(scanner32.settings, noise="reference"))
    with pytest.raises(MemscanError, match="shared"):
        explain(reference, [PROMPT], "grad")


def test_gradient_runs_eagerly_when_the_engine_cannot_differentiate(scanner32):
    from scanner.engines import TorchEngine

    class NoGradEngine(TorchEngine):
        """Stands for a compiled engine (ONNX, TensorRT): outputs carry no autograd graph."""

        name = "nograd"

        def predict(self, latents, timestep, conditioning):
            with torch.no_grad():
                return super().predict(latents, timestep, conditioning)

    compiled = Scanner(scanner32.model, scanner32.settings, engine=NoGradEngine(scanner32.family.denoiser_module()))
    np.testing.assert_allclose(
        token_significance(compiled, [PROMPT]), token_significance(scanner32, [PROMPT]), rtol=1e-4, atol=1e-9
    )
    (by_ablation,) = explain(compiled, [PROMPT], "ablation")
    assert len(by_ablation.words) == len(split_words(compiled.family.tokenizer, PROMPT))


def test_both_methods_on_the_onnx_engine(scanner32, tmp_path):
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    from scanner.engines import create_engine

    model = scanner32.model
    engine = create_engine("onnx", model.family.denoiser_module(), cache_dir=tmp_path, cache_key=model.fingerprint)
    on_onnx = Scanner(model, scanner32.settings, engine=engine)
    for method in ("ablation", "grad"):
        (got,) = explain(on_onnx, [PROMPT], method)
        (want,) = explain(scanner32, [PROMPT], method)
        assert [w.word for w in got.words] == [w.word for w in want.words]
        np.testing.assert_allclose([w.score for w in got.words], [w.score for w in want.words], rtol=1e-3, atol=1e-5)


def test_a_digit_run_is_one_word(tiny_sd1):
    tokenizer = load_model(tiny_sd1, device="cpu").family.tokenizer
    words = split_words(tokenizer, "poster 1914 2x")
    assert [w.text for w in words][:2] == ["poster", "1914"]
    assert words[1].positions == (2, 3, 4, 5)  # CLIP's four digit pieces, one word


def test_the_default_method_is_ablation(scanner32):
    from scanner.explain import DEFAULT_METHOD

    (explanation,) = explain(scanner32, [PROMPT])
    assert DEFAULT_METHOD == explanation.method == "ablation"


def test_suggestion_is_the_greedy_set_that_makes_the_prompt_safe(scanner32, monkeypatch):
    from scanner.explain import drop_words

    (plain,) = explain(scanner32, [PROMPT])
    words = split_words(scanner32.family.tokenizer, PROMPT)
    # Under every single-word drop: one word is not enough, the greedy must go on.
    threshold = min(w.score_without for w in plain.words) - 1e-4
    assert plain.score >= threshold
    calls = []
    score = Scanner.score
    monkeypatch.setattr(Scanner, "score", lambda self, prompts, *a, **k: calls.append(len(prompts)) or score(self, prompts, *a, **k))
    (explanation,) = explain(scanner32, [PROMPT], threshold=threshold)
    suggestion = explanation.suggestion
    assert len(suggestion.words) >= 2 and suggestion.safe
    # One batch per round after the explanation's own two: n - k candidates in round k.
    assert calls[2:] == [len(words) - k for k in range(len(suggestion.words))]
    fresh = Scanner(scanner32.model, scanner32.settings)
    chosen = [words[i] for i in suggestion.words]
    assert suggestion.prompt == drop_words(PROMPT, chosen)
    assert fresh.score([suggestion.prompt]).score[0] == pytest.approx(suggestion.score, abs=1e-5) and suggestion.score < threshold
    assert fresh.score([drop_words(PROMPT, chosen[:-1])]).score[0] >= threshold  # not done one word earlier
    assert suggestion.words[0] == int(np.argmax([w.score for w in plain.words]))  # first: the top ablation word
    # Each later word is the one whose removal, with those before it, lowers the score most.
    for k in range(1, len(chosen)):
        rest = [i for i in range(len(words)) if i not in suggestion.words[:k]]
        scores = fresh.score([drop_words(PROMPT, [*chosen[:k], words[i]]) for i in rest]).score
        assert rest[int(np.argmin(scores))] == suggestion.words[k]
    monkeypatch.undo()
    (safe,) = explain(scanner32, [PROMPT], threshold=plain.score + 1.0)
    (unjudged,) = explain(scanner32, [PROMPT])
    assert safe.suggestion is None and unjudged.suggestion is None
