"""Mitigation at inference (method.md): move the prompt embedding until its magnitude drops.

The paper's method optimizes the conditional text embedding `e` (start: the prompt's
encoder output) on the very initial latents that will be generated from, minimizing
`L(e) = mean_g || f(x_T[g], t_0, e) - f(x_T[g], t_0, e_0) ||_2` (in the score space; the mean
over generations puts `L` on the scale of `memscan scan` scores, so that a target picked
from normal prompts' scores applies) with AdamW (lr 0.05), at most 10 iterations, stopping
once `L <= target`. What moves is what the family conditions on (`Family.trainable_keys`:
the token sequence, and the pooled embedding where there is one); the sequence's leading
BOS position (`Family.frozen_positions`) is not a parameter, so it stays exactly as encoded.
Prompts already at or under the trigger (default: the target) are left untouched. A model
folder may set its own budget in `mitigation.json` (`model_budget`): the paper's was chosen
for SD v1.4, as its target was.

Baselines (Somepalli et al. 2023) change the prompt or the embedding at random instead.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .detect import Scanner
from .errors import MemscanError
from .families import Conditioning, cond_expand
from .generate import generate_images, seed_latents

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

METHODS = ("embed", "rand-token", "rand-number", "embed-noise")
# Baseline strengths (documented in the README): how much randomness each one adds.
RANDOM_TOKENS = 4  # decoded random CLIP tokens inserted at random word positions
RANDOM_NUMBERS = 4  # random integers in [0, 10^6) inserted at random word positions
EMBED_NOISE_STD = 0.1  # std of Gaussian noise added to every unfrozen position of the trainable embeddings
BUDGET_FILE = "mitigation.json"  # in a model folder: {"learning_rate": ..., "max_iterations": ...}


@dataclass(frozen=True)
class MitigationSettings:
    """The paper's settings; `target` must come from the model's normal-prompt scores.

    `trigger` (default: `target`) decides which prompts are optimized at all: those with
    `L > trigger`. With a calibration it is the flagging threshold, so unflagged prompts stay
    untouched while flagged ones are moved all the way down to `target`, a typical normal
    score (see the README's mitigation table for why one number cannot do both).
    """

    target: float
    learning_rate: float = 0.05
    max_iterations: int = 10
    trigger: float | None = None


def model_budget(model: str | Path) -> dict[str, float | int]:
    """The optimization budget a model folder's `mitigation.json` sets, as `MitigationSettings` fields ({} if none)."""
    path = Path(model) / BUDGET_FILE
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MemscanError(f"{path}: not a readable JSON file ({exc})") from exc
    budget = {key: config[key] for key in ("learning_rate", "max_iterations") if isinstance(config, dict) and key in config}
    learning_rate, iterations = budget.get("learning_rate", 1.0), budget.get("max_iterations", 0)
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) or not learning_rate > 0:
        raise MemscanError(f"{path}: learning_rate must be a number > 0, got {learning_rate!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise MemscanError(f"{path}: max_iterations must be an integer >= 0, got {iterations!r}")
    return budget


@dataclass
class Mitigated:
    """A mitigated conditioning (`[1, ...]` entries), the prompt it stands for, and what it took."""

    prompt: str
    conditioning: Conditioning
    method: str
    score_before: float
    score_after: float
    iterations: int
    seconds: float


def first_step_magnitude(scanner: Scanner, cond: Conditioning, latents: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """`L(c)`: mean over latents `[S, C, H, W]` of the first-step magnitude; differentiable in `c` (`[1, ...]` entries)."""
    x = scanner.first_step_input(latents)
    out = scanner.autograd_engine().predict(x, scanner.timesteps[0], cond_expand(cond, len(latents)))
    norms = (out.float() - uncond.float()).flatten(1).norm(dim=1)
    return norms.mean() * scanner.score_scales[0]


def _frozen_mask(scanner: Scanner, key: str, tensor: torch.Tensor) -> torch.Tensor | None:
    """1 where `tensor` (an entry `key` of the conditioning, `[1, ...]`) may move, or None if all of it may."""
    frozen = scanner.family.frozen_positions if key == scanner.family.sequence_key else 0
    if frozen == 0:
        return None
    mask = torch.ones_like(tensor, dtype=torch.float32)
    mask[:, :frozen] = 0
    return mask


def optimize_embedding(
    scanner: Scanner, prompt: str, latents: torch.Tensor, settings: MitigationSettings
) -> Mitigated:
    """The paper's method: AdamW on the family's trainable conditioning (BOS fixed) until `L <= target`."""
    started = time.perf_counter()
    uncond = scanner.unconditional_first_step(latents)
    with torch.no_grad():
        encoded = scanner.family.encode([prompt])
    keys = scanner.family.trainable_keys
    params = {k: encoded[k].detach().clone().float().requires_grad_(True) for k in keys}
    masks = {k: _frozen_mask(scanner, k, encoded[k]) for k in keys}
    optimizer = torch.optim.AdamW(list(params.values()), lr=settings.learning_rate)

    def conditioning() -> Conditioning:
        # Frozen positions are taken from the encoding itself, so they stay bit-identical.
        moved = {k: p if masks[k] is None else torch.where(masks[k].bool(), p, encoded[k].float()) for k, p in params.items()}
        return {**encoded, **{k: v.to(encoded[k].dtype) for k, v in moved.items()}}

    with torch.enable_grad():
        loss = first_step_magnitude(scanner, conditioning(), latents, uncond)
        before = after = loss.item()
        iterations = 0
        trigger = settings.target if settings.trigger is None else settings.trigger
        while after > (trigger if iterations == 0 else settings.target) and iterations < settings.max_iterations:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            iterations += 1
            loss = first_step_magnitude(scanner, conditioning(), latents, uncond)
            after = loss.item()
    final = {k: v.detach() for k, v in conditioning().items()}
    return Mitigated(prompt, final, "embed", before, after, iterations, time.perf_counter() - started)


def _insert_words(prompt: str, words: list[str], rng: random.Random) -> str:
    parts = prompt.split()
    for word in words:
        parts.insert(rng.randint(0, len(parts)), word)
    return " ".join(parts)


def random_tokens(tokenizer: PreTrainedTokenizerBase, count: int, rng: random.Random) -> list[str]:
    """`count` decoded random CLIP tokens (special tokens excluded), as the reference draws them."""
    specials = set(tokenizer.all_special_ids)
    words = []
    while len(words) < count:
        token_id = rng.randrange(len(tokenizer))
        text = tokenizer.decode([token_id]).strip()
        if token_id not in specials and re.search(r"\w", text):
            words.append(text)
    return words


def baseline(
    scanner: Scanner, prompt: str, method: str, latents: torch.Tensor, seed: int = 0
) -> Mitigated:
    """One of Somepalli et al.'s baselines: `rand-token`, `rand-number` or `embed-noise`."""
    started = time.perf_counter()
    rng = random.Random(seed)
    uncond = scanner.unconditional_first_step(latents)
    edits: dict[str, Callable[[], str]] = {
        "rand-token": lambda: _insert_words(prompt, random_tokens(scanner.model.tokenizer, RANDOM_TOKENS, rng), rng),
        "rand-number": lambda: _insert_words(prompt, [str(rng.randrange(10**6)) for _ in range(RANDOM_NUMBERS)], rng),
        "embed-noise": lambda: prompt,
    }
    if method not in edits:
        raise ValueError(f"unknown baseline {method!r}")
    new_prompt = edits[method]()
    with torch.no_grad():
        original = scanner.family.encode([prompt])
        cond = original if new_prompt == prompt else scanner.family.encode([new_prompt])
        if method == "embed-noise":
            generator = torch.Generator("cpu").manual_seed(seed)
            noisy = {}
            for key in scanner.family.trainable_keys:
                noise = torch.randn(cond[key].shape, generator=generator) * EMBED_NOISE_STD
                mask = _frozen_mask(scanner, key, cond[key])  # BOS stays, as in the paper's method
                noise = noise if mask is None else noise * mask
                noisy[key] = cond[key] + noise.to(cond[key].device, cond[key].dtype)
            cond = {**cond, **noisy}
        before = float(first_step_magnitude(scanner, original, latents, uncond))
        after = float(first_step_magnitude(scanner, cond, latents, uncond))
    return Mitigated(new_prompt, cond, method, before, after, 0, time.perf_counter() - started)


def mitigate(
    scanner: Scanner, prompt: str, method: str, latents: torch.Tensor, settings: MitigationSettings, seed: int = 0
) -> Mitigated:
    """Mitigate `prompt` for generation from `latents` with `method` (one of `METHODS`)."""
    if method == "embed":
        return optimize_embedding(scanner, prompt, latents, settings)
    return baseline(scanner, prompt, method, latents, seed)


@dataclass
class MitigatedGeneration:
    """A mitigation and the generations before `[S, H, W, 3]` and after it (uint8, same seeds)."""

    result: Mitigated
    before: np.ndarray
    after: np.ndarray


def mitigate_and_generate(
    scanner: Scanner, pipeline: Any, prompt: str, method: str, seeds: list[int],
    settings: MitigationSettings, steps: int = 50, guidance: float | None = None,
) -> MitigatedGeneration:
    """Mitigate `prompt` on the latents of `seeds`, then generate from the original and the mitigated conditioning
    (`guidance` None: the family's pipeline default)."""
    latents = seed_latents(scanner.model, seeds)
    result = mitigate(scanner, prompt, method, latents, settings, seed=seeds[0])
    with torch.no_grad():
        original = scanner.family.encode([prompt])
    before = generate_images(scanner.family, pipeline, original, latents, steps, guidance)
    after = generate_images(scanner.family, pipeline, result.conditioning, latents, steps, guidance)
    return MitigatedGeneration(result, before, after)
