"""The memorization score: `|| unet(x, t, e_prompt) - unet(x, t, e_empty) ||_2` (method.md).

For each prompt, generation (initial latent) and sampling step `s` in the window
`[start_step, end_step)`, the norm of the text-conditional noise prediction's difference
from the unconditional one, in epsilon space and fp32. A prompt's score is the mean over
the window's steps and the generations.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .cache import cache_dir
from .encode import PromptEncoder, TokenizedPrompts
from .engines import ENGINES, TorchEngine, UNetEngine, create_engine
from .errors import MemscanError
from .kernels import guidance_norm, guided_prediction
from .model import ScanModel, load_model

NOISE_MODES = ("shared", "reference")


@dataclass(frozen=True)
class DetectSettings:
    """How prompts are scored; the defaults are the paper's first-step, one-generation detector."""

    num_inference_steps: int = 50
    start_step: int = 0
    end_step: int = 1
    generations: int = 1
    guidance_scale: float = 7.5
    seed: int = 0
    noise: str = "shared"

    def __post_init__(self) -> None:
        if self.num_inference_steps < 1:
            raise MemscanError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if not 0 <= self.start_step < self.end_step <= self.num_inference_steps:
            raise MemscanError(
                f"step window [{self.start_step}, {self.end_step}) must satisfy "
                f"0 <= start < end <= num_inference_steps ({self.num_inference_steps})"
            )
        if self.generations < 1:
            raise MemscanError(f"generations must be >= 1, got {self.generations}")
        if self.noise not in NOISE_MODES:
            raise MemscanError(f"noise must be one of {', '.join(NOISE_MODES)}, got {self.noise!r}")

    @property
    def first_step_only(self) -> bool:
        """True when only `x_T` at the first timestep is scored (no trajectory needed)."""
        return self.start_step == 0 and self.end_step == 1

    def to_dict(self) -> dict:
        """Plain-data form, recorded with every result."""
        return asdict(self)


@dataclass
class PromptScores:
    """Scores of a batch: per generation `[B, n]` (mean over the window's steps)."""

    per_generation: np.ndarray
    n_tokens: list[int]
    truncated: list[bool]

    @property
    def score(self) -> np.ndarray:
        """Each prompt's score: the mean over generations, `[B]`."""
        return self.per_generation.mean(axis=1)


def epsilon_scale(prediction_type: str, alpha_bar: float) -> float:
    """Factor that turns a difference of two model outputs at one `x_t` into one of epsilons."""
    if prediction_type == "epsilon":
        return 1.0
    if prediction_type == "v_prediction":  # eps = sqrt(ab) * v + sqrt(1 - ab) * x_t
        return math.sqrt(alpha_bar)
    if prediction_type == "sample":  # eps = (x_t - sqrt(ab) * x0) / sqrt(1 - ab)
        return math.sqrt(alpha_bar / (1.0 - alpha_bar))
    raise MemscanError(f"unsupported prediction_type {prediction_type!r}")


class Scanner:
    """Scores batches of prompts for one model and one `DetectSettings`; holds the caches."""

    def __init__(
        self, model: ScanModel, settings: DetectSettings, engine=None, cache_size: int = 65536, reuse_uncond: bool = True
    ):
        """`reuse_uncond=False` recomputes the unconditional prediction with every batch (benchmarks)."""
        from diffusers import DDIMScheduler

        self.model = model
        self.settings = settings
        self.engine = engine or TorchEngine(model.unet)
        self.encoder = PromptEncoder(model.tokenizer, model.text_encoder)
        self.scheduler = DDIMScheduler.from_config(model.scheduler_config)
        self.scheduler.set_timesteps(settings.num_inference_steps, device=model.device)
        self.timesteps = self.scheduler.timesteps[: settings.end_step]
        alphas = self.scheduler.alphas_cumprod
        self.eps_scales = [epsilon_scale(model.prediction_type, float(alphas[int(t)])) for t in self.timesteps]
        self.cache_size = cache_size
        self.reuse_uncond = reuse_uncond
        self._cache: OrderedDict[str, tuple[np.ndarray, int, bool]] = OrderedDict()
        self._shared: tuple[torch.Tensor, torch.Tensor] | None = None

    def autograd_engine(self) -> UNetEngine:
        """The engine for autograd paths (explain, mitigate): this one, or the same UNet eagerly."""
        # Compiled engines cannot differentiate.
        return self.engine if self.engine.name == "torch" else TorchEngine(self.model.unet)

    # -- initial latents ----------------------------------------------------------------
    def shared_latents(self) -> torch.Tensor:
        """`[n, C, H, W]` from `seed` alone, drawn on the CPU in fp32 so every device agrees."""
        generator = torch.Generator("cpu").manual_seed(self.settings.seed)
        shape = (self.settings.generations, *self.model.latent_shape)
        latents = torch.randn(shape, generator=generator, dtype=torch.float32)
        return latents.to(self.model.device, self.model.dtype)

    def reference_latents(self, index: int) -> torch.Tensor:
        """`[n, C, H, W]` as the reference draws them for prompt `index`: seed `index + seed`."""
        device = self.model.device
        generator = torch.Generator(device).manual_seed(index + self.settings.seed)
        shape = (self.settings.generations, *self.model.latent_shape)
        return torch.randn(shape, generator=generator, device=device, dtype=self.model.dtype)

    def _shared_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Shared latents and their unconditional prediction at the first step, computed once."""
        if self._shared is None:
            latents = self.shared_latents() * self.scheduler.init_noise_sigma
            t0 = self.timesteps[0]
            empty = self.encoder.empty_embedding().expand(len(latents), -1, -1)
            uncond = self.engine.predict_noise(self.scheduler.scale_model_input(latents, t0), t0, empty)
            self._shared = (latents, uncond)
        return self._shared

    # -- scoring --------------------------------------------------------------------------
    @torch.inference_mode()
    def score(
        self, prompts: Sequence[str], indices: Sequence[int] | None = None, tokens: TokenizedPrompts | None = None
    ) -> PromptScores:
        """Score prompts; `indices` (0-based positions in the input) are needed in reference mode.

        `tokens`, when given, is `self.encoder.tokenize(prompts)` done ahead (off the model's thread).
        """
        if tokens is None:
            tokens = self.encoder.tokenize(prompts)
        if self.settings.noise == "reference":
            if indices is None or len(indices) != len(prompts):
                raise ValueError("reference noise mode needs one input index per prompt")
            latents = torch.stack([self.reference_latents(i) for i in indices])
            return self._compute(tokens, latents)
        # Shared noise: a prompt's score depends on the prompt alone, so score each once.
        todo: dict[str, int] = {}  # prompt -> its first row
        for row, prompt in enumerate(prompts):
            if prompt not in self._cache:
                todo.setdefault(prompt, row)
        fresh = {}
        if todo:
            result = self._compute(tokens.select(todo.values()))
            for i, prompt in enumerate(todo):
                fresh[prompt] = (result.per_generation[i], result.n_tokens[i], result.truncated[i])
        rows = [fresh.get(p) or self._cache[p] for p in prompts]
        for prompt, row in fresh.items():
            self._remember(prompt, row)
        return PromptScores(
            np.stack([r[0] for r in rows]), [r[1] for r in rows], [r[2] for r in rows]
        )

    def _remember(self, prompt: str, row: tuple[np.ndarray, int, bool]) -> None:
        self._cache[prompt] = row
        self._cache.move_to_end(prompt)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _compute(self, tokens: TokenizedPrompts, latents: torch.Tensor | None = None) -> PromptScores:
        encoded = self.encoder.encode_tokens(tokens)
        count = len(encoded.n_tokens)
        if latents is None and self.settings.first_step_only and self.reuse_uncond:
            norms = self._first_step_shared(encoded.embeddings)
        else:
            if latents is None:
                latents = self.shared_latents().expand(count, -1, -1, -1, -1)
            norms = self._trajectory(encoded.embeddings, latents)
        return PromptScores(norms.cpu().numpy(), encoded.n_tokens, encoded.truncated)

    def _first_step_shared(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Fast path: one conditional forward per (prompt, generation); cached unconditional."""
        latents, uncond = self._shared_state()
        t0 = self.timesteps[0]
        b = len(embeddings)
        norms = []
        for g in range(len(latents)):  # each generation's rows share one cached uncond row
            rows = self.scheduler.scale_model_input(latents[g : g + 1].expand(b, -1, -1, -1), t0)
            norms.append(self.engine.conditional_norm(rows, t0, embeddings, uncond[g : g + 1]))
        return torch.stack(norms, dim=1) * self.eps_scales[0]

    def scored_states(
        self, embeddings: torch.Tensor, latents: torch.Tensor
    ) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """`(step, t, x_s, unconditional prediction)` at each scored step, rows `[B * n]` prompt-major.

        For the autograd paths (explain, mitigate): they differentiate at each `x_s` of the
        same CFG trajectory the score walks, without a second copy of the loop.
        """
        states = []
        self._trajectory(embeddings, latents, visit=lambda *state: states.append(state))
        return states

    def _trajectory(self, embeddings: torch.Tensor, latents: torch.Tensor, visit=None) -> torch.Tensor:
        """CFG DDIM trajectory batched over prompts; latents `[B, n, C, H, W]` -> norms `[B, n]`."""
        b, n = latents.shape[:2]
        s = self.settings
        x = latents.reshape(b * n, *latents.shape[2:]) * self.scheduler.init_noise_sigma
        # Prompt-major rows and [uncond; cond] halves, as StableDiffusionPipeline batches them.
        text = torch.cat([self.encoder.empty_embedding().expand(b * n, -1, -1), embeddings.repeat_interleave(n, dim=0)])
        total = torch.zeros(b * n, dtype=torch.float32, device=x.device)
        for step, t in enumerate(self.timesteps):
            out = self.engine.predict_noise(self.scheduler.scale_model_input(torch.cat([x, x]), t), t, text)
            uncond, cond = out.chunk(2)
            if visit is not None and step >= s.start_step:
                visit(step, t, x, uncond)
            if step + 1 < len(self.timesteps):
                norm, guided = guided_prediction(cond, uncond, s.guidance_scale)
                x = self.scheduler.step(guided, t, x, return_dict=False)[0]
            else:
                norm = guidance_norm(cond, uncond)
            if step >= s.start_step:
                total += norm * self.eps_scales[step]
        return (total / (s.end_step - s.start_step)).view(b, n)


@dataclass(frozen=True)
class ScannerSpec:
    """What a `Scanner` is made of, as plain data: checked where it is written, loaded where it runs
    (the command's process, or each Ray worker)."""

    model: str
    settings: DetectSettings
    device: str = "auto"
    dtype: str = "auto"
    engine: str = "torch"

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise MemscanError(f"unknown engine {self.engine!r} (available: {', '.join(ENGINES)})")

    def load(self) -> Scanner:
        """Load the model on the device, start the engine, and return the scanner."""
        model = load_model(self.model, device=self.device, dtype=self.dtype)
        engine = create_engine(self.engine, model.unet, cache_dir=cache_dir(), cache_key=model.fingerprint)
        return Scanner(model, self.settings, engine=engine)
