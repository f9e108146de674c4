"""Mitigation at inference (method.md): move the prompt embedding until its magnitude drops.

The paper's method optimizes the conditional text embedding `e` (start: the prompt's
encoder output) on the very initial latents that will be generated from, minimizing
`L(e) = mean_g || unet(x_T[g], t_0, e) - unet(x_T[g], t_0, e_0) ||_2` (epsilon space; the mean
over generations puts `L` on the scale of `memscan scan` scores, so that a target picked
from normal prompts' scores applies) with AdamW (lr 0.05), at most 10 iterations, stopping
once `L <= target`. Position 0 (BOS) is not a parameter, so it stays exactly as encoded;
the other positions move. Prompts already at or under the trigger (default: the target) are
left untouched. A model folder may set its own budget in `mitigation.json` (`model_budget`):
the paper's was chosen for SD v1.4, as its target was.

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
from typing import TYPE_CHECKING

import numpy as np
import torch

from .detect import Scanner
from .errors import MemscanError
from .generate import generate_images, seed_latents

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline
    from transformers import PreTrainedTokenizerBase

METHODS = ("embed", "rand-token", "rand-number", "embed-noise")
# Baseline strengths (documented in the README): how much randomness each one adds.
RANDOM_TOKENS = 4  # decoded random CLIP tokens inserted at random word positions
RANDOM_NUMBERS = 4  # random integers in [0, 10^6) inserted at random word positions
EMBED_NOISE_STD = 0.1  # std of Gaussian noise added to every prompt position of the embedding
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
    """A mitigated embedding `[1, L, D]`, the prompt it stands for, and what it took."""

    prompt: str
    embedding: torch.Tensor
    method: str
    score_before: float
    score_after: float
    iterations: int
    seconds: float


def first_step_magnitude(scanner: Scanner, embedding: torch.Tensor, latents: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """`L(e)`: mean over latents `[S, C, H, W]` of the first-step magnitude; differentiable in `e` `[1, L, D]`."""
    t0 = scanner.timesteps[0]
    x = scanner.scheduler.scale_model_input(latents * scanner.scheduler.init_noise_sigma, t0)
    cond = scanner.autograd_engine().predict_noise(x, t0, embedding.expand(len(latents), -1, -1))
    norms = (cond.float() - uncond.float()).flatten(1).norm(dim=1)
    return norms.mean() * scanner.eps_scales[0]


def unconditional_first_step(scanner: Scanner, latents: torch.Tensor) -> torch.Tensor:
    """`unet(x_T, t_0, e_0)` for latents `[S, C, H, W]` (no gradient)."""
    t0 = scanner.timesteps[0]
    x = scanner.scheduler.scale_model_input(latents * scanner.scheduler.init_noise_sigma, t0)
    with torch.no_grad():
        return scanner.engine.predict_noise(x, t0, scanner.encoder.empty_embedding().expand(len(latents), -1, -1))


def optimize_embedding(
    scanner: Scanner, prompt: str, latents: torch.Tensor, settings: MitigationSettings
) -> Mitigated:
    """The paper's method: AdamW on positions 1.. of the embedding until `L <= target`."""
    started = time.perf_counter()
    uncond = unconditional_first_step(scanner, latents)
    with torch.no_grad():
        encoded = scanner.encoder.encode([prompt]).embeddings
    bos, rest = encoded[:, :1], encoded[:, 1:].detach().clone().float().requires_grad_(True)
    optimizer = torch.optim.AdamW([rest], lr=settings.learning_rate)

    def embedding() -> torch.Tensor:
        return torch.cat([bos, rest.to(encoded.dtype)], dim=1)

    with torch.enable_grad():
        loss = first_step_magnitude(scanner, embedding(), latents, uncond)
        before = after = loss.item()
        iterations = 0
        trigger = settings.target if settings.trigger is None else settings.trigger
        while after > (trigger if iterations == 0 else settings.target) and iterations < settings.max_iterations:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            iterations += 1
            loss = first_step_magnitude(scanner, embedding(), latents, uncond)
            after = loss.item()
    return Mitigated(prompt, embedding().detach(), "embed", before, after, iterations, time.perf_counter() - started)


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
    uncond = unconditional_first_step(scanner, latents)
    edits: dict[str, Callable[[], str]] = {
        "rand-token": lambda: _insert_words(prompt, random_tokens(scanner.model.tokenizer, RANDOM_TOKENS, rng), rng),
        "rand-number": lambda: _insert_words(prompt, [str(rng.randrange(10**6)) for _ in range(RANDOM_NUMBERS)], rng),
        "embed-noise": lambda: prompt,
    }
    if method not in edits:
        raise ValueError(f"unknown baseline {method!r}")
    new_prompt = edits[method]()
    with torch.no_grad():
        original = scanner.encoder.encode([prompt]).embeddings
        embedding = original if new_prompt == prompt else scanner.encoder.encode([new_prompt]).embeddings
        if method == "embed-noise":
            generator = torch.Generator("cpu").manual_seed(seed)
            noise = torch.randn(embedding.shape, generator=generator) * EMBED_NOISE_STD
            noise[:, 0] = 0  # BOS stays, as in the paper's method
            embedding = embedding + noise.to(embedding.device, embedding.dtype)
        before = float(first_step_magnitude(scanner, original, latents, uncond))
        after = float(first_step_magnitude(scanner, embedding, latents, uncond))
    return Mitigated(new_prompt, embedding, method, before, after, 0, time.perf_counter() - started)


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
    scanner: Scanner, pipeline: StableDiffusionPipeline, prompt: str, method: str, seeds: list[int],
    settings: MitigationSettings, steps: int = 50, guidance: float = 7.5,
) -> MitigatedGeneration:
    """Mitigate `prompt` on the latents of `seeds`, then generate from the original and the mitigated embedding."""
    latents = seed_latents(scanner.model, seeds)
    result = mitigate(scanner, prompt, method, latents, settings, seed=seeds[0])
    empty = scanner.encoder.empty_embedding()
    with torch.no_grad():
        original = scanner.encoder.encode([prompt]).embeddings
    before = generate_images(pipeline, original, empty, latents, steps, guidance)
    after = generate_images(pipeline, result.embedding, empty, latents, steps, guidance)
    return MitigatedGeneration(result, before, after)
