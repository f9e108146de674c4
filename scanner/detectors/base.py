"""The detector interface and what every detector shares (latents, score spaces, cached rows).

A detector turns prompts into one memorization score each (higher = more memorized). It is
built from a loaded `Scanner`, so it reuses its model, family adapter, engine and seed; its
own settings (a frozen dataclass) carry the defaults of its paper's reference code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, is_dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ..detect import Scanner
from ..encode import TokenizedPrompts
from ..errors import MemscanError
from ..families import Conditioning, Trajectory, cond_expand


class Detector(ABC):
    """One memorization detector over a loaded `Scanner`: `score(prompts) -> [B]`, higher = memorized."""

    name: ClassVar[str]
    settings_type: ClassVar[type]
    # Why the detector needs the eager torch denoiser, for the commands that refuse another --engine
    # (it would run eagerly anyway while the records named the engine); empty when any engine runs it.
    eager_only: ClassVar[str] = ""

    def __init__(self, scanner: Scanner, settings: Any = None):
        # Every detector but `wen` draws one set of initial latents for all prompts, so a
        # prompt's score depends on the prompt alone and unconditional rows can be cached.
        if scanner.settings.noise != "shared":
            raise MemscanError(f"the {self.name} detector needs shared noise (got noise={scanner.settings.noise!r})")
        self.scanner = scanner
        self.family = scanner.family
        self.settings = self.settings_type() if settings is None else settings
        if not isinstance(self.settings, self.settings_type):
            raise TypeError(f"{self.name} takes {self.settings_type.__name__}, got {type(self.settings).__name__}")
        self._uncond: dict[tuple, torch.Tensor] = {}

    @abstractmethod
    def forwards_per_prompt(self) -> int:
        """Denoiser forward passes per prompt (work shared by all prompts, such as cached unconditional rows, excluded)."""

    def jvps_per_prompt(self) -> int:
        """Denoiser Jacobian-vector products per prompt (rows of a forward-mode pass)."""
        return 0

    @abstractmethod
    def score(self, prompts: Sequence[str], tokens: TokenizedPrompts | None = None) -> np.ndarray:
        """Each prompt's score `[B]` (float64), higher = more memorized; `tokens` is `family.tokenize(prompts)` done ahead."""

    def describe(self) -> dict:
        """The detector's name, settings and cost, as plain data (recorded with evaluations)."""
        settings = asdict(self.settings) if is_dataclass(self.settings) else {}
        return {"detector": self.name, "settings": settings, "forwards_per_prompt": self.forwards_per_prompt(),
                "jvps_per_prompt": self.jvps_per_prompt()}

    # -- shared pieces -------------------------------------------------------------------
    def encode(self, prompts: Sequence[str], tokens: TokenizedPrompts | None = None) -> Conditioning:
        """The prompts' conditioning, the text encoders run by the scanner's engine, from `tokens` when given: a scan
        tokenizes in its prefetch thread, and a fast tokenizer must not be entered from two threads at once."""
        return self.scanner.encode_tokens(self.family.tokenize(prompts) if tokens is None else tokens)

    def latents(self, generations: int, size: int | None = None) -> torch.Tensor:
        """`[n, C, H, W]` unit Gaussian latents from the scanner's seed, drawn on the CPU in fp32 (as `Scanner.shared_latents`)."""
        channels, height, width = self.scanner.model.latent_shape
        if size is not None:
            height = width = size
        generator = torch.Generator("cpu").manual_seed(self.scanner.settings.seed)
        latents = torch.randn((generations, channels, height, width), generator=generator, dtype=torch.float32)
        return latents.to(self.scanner.model.device, self.scanner.model.dtype)

    def unconditional(self, trajectory: Trajectory, step: int, x: torch.Tensor) -> torch.Tensor:
        """The unconditional prediction at step `step` for `x_t` rows `[n, C, H, W]`, computed once per step and shape."""
        key = (len(trajectory.timesteps), step, tuple(x.shape))
        if key not in self._uncond:
            uncond = cond_expand(self.family.unconditional(), len(x))
            with torch.no_grad():
                self._uncond[key] = self.scanner.engine.predict(
                    trajectory.model_input(x, step), trajectory.timesteps[step], uncond
                )
        return self._uncond[key]

    def conditional(self, trajectory: Trajectory, step: int, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The conditional prediction at step `step` for `x_t` rows and conditioning rows of the same count."""
        with torch.no_grad():
            return self.scanner.engine.predict(trajectory.model_input(x, step), trajectory.timesteps[step], cond)


def prompt_rows(x: torch.Tensor, prompts: int) -> torch.Tensor:
    """`[n, ...]` generations as prompt-major rows `[prompts * n, ...]` (row `b * n + g` is generation `g`)."""
    return x.repeat(prompts, *([1] * (x.dim() - 1)))


def wide(t: torch.Tensor) -> torch.Tensor:
    """`t` in fp32, or wider when it already is (a float64 reference model stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def alpha_sigma(trajectory: Trajectory, step: int) -> tuple[float, float]:
    """`(alpha_t, sigma_t)` with `x_t = alpha_t x0 + sigma_t eps` at step `step` (flow: `1 - s, s`)."""
    if trajectory.flow:
        s = float(trajectory.scheduler.sigmas[step])
        return 1.0 - s, s
    alpha_bar = float(trajectory.scheduler.alphas_cumprod[int(trajectory.timesteps[step])])
    return alpha_bar**0.5, (1.0 - alpha_bar) ** 0.5


def in_space(out: torch.Tensor, x: torch.Tensor, trajectory: Trajectory, step: int, space: str) -> torch.Tensor:
    """A raw denoiser output at `x_t` as a prediction in `space`: `model` as is, `epsilon` converted in full.

    Unlike `Trajectory.score_scale` (differences, where the `x_t` terms cancel), cosines and
    noise maps need the whole epsilon: v-prediction `eps = alpha v + sigma x_t`, sample
    prediction `eps = (x_t - alpha x0) / sigma`, flow `eps = x_t + (1 - s) v`.
    """
    if space == "model":
        return out
    alpha, sigma = alpha_sigma(trajectory, step)
    if trajectory.flow:
        return x + alpha * out
    kind = trajectory.prediction_type
    if kind == "epsilon":
        return out
    if kind == "v_prediction":
        return alpha * out + sigma * x
    if kind == "sample":
        return (x - alpha * out) / sigma
    raise MemscanError(f"unsupported prediction_type {kind!r}")


def check_steps(num_inference_steps: int, *steps: int) -> None:
    """Refuse a step index outside a schedule of `num_inference_steps` steps."""
    for step in steps:
        if not -num_inference_steps <= step < num_inference_steps:
            raise MemscanError(f"step {step} is outside a {num_inference_steps}-step schedule")
