"""SD 3 (`StableDiffusion3Pipeline`), with and without T5: memscan against diffusers' own pipeline.

A tiny random pipeline is saved and loaded by memscan's loader; the unmodified pipeline runs
on the same latents while a forward hook records its transformer calls (one `[uncond; cond]`
batch per step), and the expected scores are computed from those outputs in float64.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest
from tiny_families import one_thread, split_call  # noqa: F401 (one_thread: an autouse fixture)
from tiny_families_flow import (
    PROMPTS,
    TinyPipeline,
    check_epsilon_space,
    check_mitigation,
    check_parity,
    check_significance,
)

from scanner.errors import MemscanError
from scanner.model import load_model

SEED = random.randrange(2**31)  # fresh latents each run, shown in the messages
GUIDANCE = random.uniform(3.0, 9.0)  # shapes every step after the first


class TinySD3(TinyPipeline):
    """A tiny SD3 model and its `StableDiffusion3Pipeline`."""

    def latent_shape(self) -> tuple[int, int, int]:
        """The pipeline's default: the transformer's sample size."""
        cfg = self.pipe.transformer.config
        return (cfg.in_channels, cfg.sample_size, cfg.sample_size)

    def step_pairs(self, calls):
        """One `[uncond; cond]` call per step."""
        return [split_call(call) for call in calls]


@pytest.fixture(scope="module", params=[True, False], ids=["t5", "no-t5"])
def tiny(request, tiny_family) -> TinySD3:
    from diffusers import StableDiffusion3Pipeline

    path = tiny_family("sd3", with_t5=request.param)
    # Without T5 as SD3 is run to save memory: the pipeline then zero-fills T5's part.
    absent = {} if request.param else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = StableDiffusion3Pipeline.from_pretrained(path, **absent)
    pipe.set_progress_bar_config(disable=True)
    tiny = TinySD3(load_model(path, device="cpu"), pipe, SEED, GUIDANCE, "with T5" if request.param else "without T5")
    tiny.path = path
    return tiny


@pytest.mark.parametrize(
    "window, generations, batch_size",
    [((0, 1), 1, 1), ((0, 1), 1, 7), ((0, 1), 4, 7), ((0, 3), 1, 7), ((0, 3), 4, 7)],
)
def test_scores_match_diffusers_pipeline(tiny, window, generations, batch_size):
    check_parity(tiny, window, generations, (batch_size,), PROMPTS)


def test_epsilon_space_and_token_counts(tiny):
    """Epsilon scores are (1 - sigma) times the velocity's (0 at sigma = 1); counts and truncation are CLIP-L's."""
    check_epsilon_space(tiny, PROMPTS)
    tokens = tiny.model.family.tokenize(PROMPTS)
    expected = [len(tiny.pipe.tokenizer(p, add_special_tokens=False).input_ids) for p in PROMPTS]
    assert tokens.n_tokens == expected and tokens.truncated == [n > 75 for n in expected]
    assert tokens.truncated[4] and not tokens.truncated[0]


def test_gradient_significance_matches_float64_autograd(tiny):
    """Explain's gradient over the joint sequence, against autograd on the pipeline's own call arguments in float64."""
    check_significance(tiny, random.choice(PROMPTS))


def test_mitigation_lowers_the_score_and_keeps_bos(tiny):
    check_mitigation(tiny, random.choice(PROMPTS))


def test_refusals(tiny, tmp_path):
    """A T5 encoder without its tokenizer, and a scheduler other than flow matching, are refused in one line."""
    broken = shutil.copytree(tiny.path, tmp_path / "broken")
    if (broken / "text_encoder_3").is_dir():
        shutil.rmtree(broken / "tokenizer_3")
        with pytest.raises(MemscanError, match="tokenizer_3"):
            load_model(broken, device="cpu")
    config = broken / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "_class_name": "DDIMScheduler"}))
    with pytest.raises(MemscanError, match="FlowMatchEulerDiscreteScheduler") as refused:
        load_model(broken, device="cpu")
    assert "\n" not in str(refused.value)
