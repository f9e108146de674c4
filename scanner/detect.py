"""The memorization score: `|| denoiser(x, t, c_prompt) - denoiser(x, t, c_empty) ||_2` (method.md).

For each prompt, generation (initial latent) and sampling step `s` in the window
`[start_step, end_step)`, the norm of the text-conditional prediction's difference from the
unconditional one, in the score space (epsilon for diffusion families, the raw output, the
velocity, for flow families) and fp32. A prompt's score is the mean over the window's steps
and the generations. The model's family (`scanner.families`) encodes, calls the denoiser and
walks the trajectory; nothing here knows which family it is. The engine runs the denoiser and,
for scoring, the text encoders (`encode_tokens`); the autograd paths (explain, mitigate) encode
with the family's eager modules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .cache import cache_dir
from .encode import TokenizedPrompts
from .engines import ENGINES, DenoiserEngine, TorchEngine, create_engine
from .errors import MemscanError
from .families import Conditioning, cond_cat, cond_expand, cond_repeat, cond_rows
from .kernels import guidance_norm, guided_prediction
from .model import ScanModel, load_model
from .scores import NOISE_MODES, DetectSettings, PendingScores, PromptScores, ScoreCache, ScoreRow, cached_scores

__all__ = [
    "NOISE_MODES", "DetectSettings", "HostCopy", "PendingScores", "PromptScores", "ScoreRow", "Scanner", "ScannerSpec",
]


class HostCopy:
    """Per-generation scores `[B, n]` of one computed batch, on their way to the host.

    On CUDA the copy starts at once into pinned memory and an event marks its end, so that
    nothing waits for the device until `numpy()` is first called.
    """

    def __init__(self, norms: torch.Tensor):
        """`norms` `[B, n]` fp32 on any device."""
        self._ready = None
        if norms.device.type == "cuda":
            norms = norms.to("cpu", non_blocking=True)  # pinned by torch: no sync
            self._ready = torch.cuda.Event()
            self._ready.record()
        self._norms = norms
        self._values: np.ndarray | None = None

    def numpy(self) -> np.ndarray:
        """The scores, once the device has written them."""
        if self._values is None:
            if self._ready is not None:
                self._ready.synchronize()
            self._values = self._norms.numpy()
        return self._values

    def failed(self) -> bool:
        """Never: a failing device raised when the batch was computed."""
        return False



class Scanner:
    """Scores batches of prompts for one model and one `DetectSettings`; holds the caches."""

    def __init__(
        self,
        model: ScanModel,
        settings: DetectSettings,
        engine: DenoiserEngine | None = None,
        cache_size: int = 65536,
        reuse_uncond: bool = True,
    ):
        """`reuse_uncond=False` recomputes the unconditional prediction with every batch (benchmarks)."""
        self.model = model
        self.family = model.family
        self.settings = settings.for_family(type(model.family))
        self.engine = engine or TorchEngine(self.family.denoiser_module())
        self.text_encoders = {name: self.engine.text_encoder(name, m) for name, m in self.family.text_encoder_modules().items()}
        # Stateless uses only (timesteps, model inputs, scales); walks make their own.
        self.schedule = self.family.schedule(self.settings.num_inference_steps)
        self.timesteps = self.schedule.timesteps[: self.settings.end_step]
        self.score_scales = [self.schedule.score_scale(self.settings.score_space, s) for s in range(len(self.timesteps))]
        self.reuse_uncond = reuse_uncond
        self._cache = ScoreCache(cache_size)
        self._shared: tuple[torch.Tensor, torch.Tensor] | None = None

    def autograd_engine(self) -> DenoiserEngine:
        """The engine for autograd paths (explain, mitigate): this one, or the same denoiser eagerly."""
        # Compiled engines cannot differentiate.
        return self.engine if self.engine.name == "torch" else TorchEngine(self.family.denoiser_module())

    def encode_tokens(self, tokens: TokenizedPrompts) -> Conditioning:
        """The conditioning of tokenized prompts, the text encoders run by the engine (the unconditional one stays the family's)."""
        return self.family.encode_tokens(tokens, self.text_encoders)

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

    def first_step_input(self, latents: torch.Tensor) -> torch.Tensor:
        """The denoiser's input at the first step for unit Gaussian latents `[R, C, H, W]`."""
        return self.schedule.model_input(self.schedule.initial(latents), 0)

    def unconditional_first_step(self, latents: torch.Tensor) -> torch.Tensor:
        """The unconditional prediction at the first step for unit Gaussian latents `[R, C, H, W]` (no gradient)."""
        with torch.no_grad():
            uncond = cond_expand(self.family.unconditional(), len(latents))
            return self.engine.predict(self.first_step_input(latents), self.timesteps[0], uncond)

    def _shared_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The denoiser's first-step input for the shared latents, and their unconditional prediction: computed once."""
        if self._shared is None:
            latents = self.shared_latents()
            self._shared = (self.first_step_input(latents), self.unconditional_first_step(latents))
        return self._shared

    # -- scoring --------------------------------------------------------------------------
    def score(
        self, prompts: Sequence[str], indices: Sequence[int] | None = None, tokens: TokenizedPrompts | None = None
    ) -> PromptScores:
        """Score prompts; `indices` (0-based positions in the input) are needed in reference mode.

        `tokens`, when given, is `self.family.tokenize(prompts)` done ahead (off the model's thread).
        """
        return self.submit(prompts, indices, tokens).result()

    @torch.inference_mode()
    def submit(
        self, prompts: Sequence[str], indices: Sequence[int] | None = None, tokens: TokenizedPrompts | None = None
    ) -> PendingScores:
        """`score`, returned before the device is done: the scores come back to the host while the next batch is
        submitted, and `result()` waits for them (on CUDA the batch's one sync; elsewhere they are ready)."""
        if tokens is None:
            tokens = self.family.tokenize(prompts)
        if self.settings.noise == "reference":
            if indices is None or len(indices) != len(prompts):
                raise ValueError("reference noise mode needs one input index per prompt")
            latents = torch.stack([self.reference_latents(i) for i in indices])
            return PendingScores.of(HostCopy(self._compute(tokens, latents)), tokens)
        # Shared noise: a prompt's score depends on the prompt alone, so score each once; prompts of a batch
        # still in flight take their rows from it.
        return cached_scores(self._cache, prompts, tokens, lambda computed: HostCopy(self._compute(computed)))

    def _compute(self, tokens: TokenizedPrompts, latents: torch.Tensor | None = None) -> torch.Tensor:
        """Per-generation scores `[B, n]` of tokenized prompts, fp32 on the model's device."""
        cond = self.encode_tokens(tokens)
        count = len(tokens.n_tokens)
        if latents is None and self.settings.first_step_only and self.reuse_uncond:
            return self._first_step_shared(cond)
        if latents is None:
            latents = self.shared_latents().expand(count, -1, -1, -1, -1)
        return self._trajectory(cond, latents)

    def _first_step_shared(self, cond: Conditioning) -> torch.Tensor:
        """Fast path: one conditional forward per (prompt, generation), all in one call; cached unconditional."""
        x, uncond = self._shared_state()
        b, n = cond_rows(cond), len(x)
        # Prompt-major rows, as the trajectory's: row i * n + g is prompt i's generation g.
        rows = x.repeat(b, 1, 1, 1)
        uncond = uncond if n == 1 else uncond.repeat(b, 1, 1, 1)  # one row broadcasts over every prompt
        norms = self.engine.conditional_norm(rows, self.timesteps[0], cond_repeat(cond, n), uncond)
        return norms.view(b, n) * self.score_scales[0]

    def scored_states(
        self, cond: Conditioning, latents: torch.Tensor
    ) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """`(step, t, x_s, unconditional prediction)` at each scored step, rows `[B * n]` prompt-major.

        For the autograd paths (explain, mitigate): they differentiate at each `x_s` of the
        same CFG trajectory the score walks, without a second copy of the loop.
        """
        states = []
        self._trajectory(cond, latents, visit=lambda *state: states.append(state))
        return states

    def _trajectory(self, cond: Conditioning, latents: torch.Tensor, visit: Callable | None = None) -> torch.Tensor:
        """CFG trajectory batched over prompts; latents `[B, n, C, H, W]` -> norms `[B, n]`."""
        b, n = latents.shape[:2]
        s = self.settings
        walk = self.family.schedule(s.num_inference_steps)
        x = walk.initial(latents.reshape(b * n, *latents.shape[2:]))
        # Prompt-major rows and [uncond; cond] halves, as the pipelines batch them.
        text = cond_cat(cond_expand(self.family.unconditional(), b * n), cond_repeat(cond, n))
        total = torch.zeros(b * n, dtype=torch.float32, device=x.device)
        for step, t in enumerate(self.timesteps):
            out = self.engine.predict(walk.model_input(torch.cat([x, x]), step), t, text)
            uncond, c = out.chunk(2)
            if visit is not None and step >= s.start_step:
                visit(step, t, x, uncond)
            if step + 1 < len(self.timesteps):
                norm, guided = guided_prediction(c, uncond, s.guidance_scale)
                x = walk.step(guided, step, x)
            else:
                norm = guidance_norm(c, uncond)
            if step >= s.start_step:
                total += norm * self.score_scales[step]
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
        engine = create_engine(self.engine, model.family.denoiser_module(), cache_dir=cache_dir(), cache_key=model.fingerprint)
        return Scanner(model, self.settings, engine=engine)
