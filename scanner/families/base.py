"""What a model family is, as the scanner sees it.

A family says how a prompt and the unconditional prompt are encoded (exactly as its diffusers
pipeline does it), how its denoiser is called, which sampler trajectory is walked, and how a
difference of two denoiser outputs becomes a score in a given space. Detect, explain,
mitigate, generate and the engines talk to a `Family` and never ask which one they have.

A family's text conditioning is a `Conditioning`: the denoiser's keyword arguments as an
ordered dict of tensors, every one batched on dim 0 (`encoder_hidden_states [B, L, D]`,
`pooled_projections [B, P]`, ...). The denoiser module (`Family.denoiser_module`) takes
`(sample [R, C, H, W], timestep [], **conditioning)` and returns its raw prediction in the
latent layout `[R, C, H, W]`, so that engines, kernels and the scoring loop are the same for
every family.

Text encoders are called the same way: `text_encoder_modules()` wraps each one as
`forward(input_ids, attention_mask=None) -> (the outputs the family takes)`, and
`encode_tokens` runs those modules (or an engine's runners of them) on `text_encoder_inputs`
and joins their outputs with the family's `conditioning`.
"""

from __future__ import annotations

import copy
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..encode import PromptTokenizer, TokenizedPrompts, tokenize_with
from ..engines.base import Conditioning, TextEncoder
from ..checkpoint import read_json
from ..errors import MemscanError
from ..scores import SCORE_SPACES

# The text encoder output that is `hidden_states[-2]` (SDXL's and SD3's CLIP layers); the
# others are named as in transformers' model outputs (`last_hidden_state`, `text_embeds`, ...).
PENULTIMATE = "penultimate_hidden_state"


def cond_expand(cond: Conditioning, rows: int) -> Conditioning:
    """A one-row conditioning broadcast to `rows` rows (a view, no copy)."""
    return {k: v.expand(rows, *v.shape[1:]) for k, v in cond.items()}


def cond_repeat(cond: Conditioning, n: int) -> Conditioning:
    """Every row repeated `n` times in place (prompt-major rows for `n` generations)."""
    return cond if n == 1 else {k: v.repeat_interleave(n, dim=0) for k, v in cond.items()}


def cond_cat(first: Conditioning, second: Conditioning) -> Conditioning:
    """Rows of `first`, then rows of `second` (the pipelines' `[uncond; cond]` batch)."""
    return {k: torch.cat([first[k], second[k]]) for k in first}


def cond_rows(cond: Conditioning) -> int:
    """How many rows the conditioning has."""
    return len(next(iter(cond.values())))


class Trajectory:
    """The sampler a family's pipeline walks: timesteps, model inputs, steps, score scales.

    Wraps a fresh diffusers scheduler; schedulers with a step counter (flow matching) are
    made anew for every trajectory, so one `Trajectory` serves one walk.
    """

    def __init__(self, scheduler, flow: bool, prediction_type: str = "epsilon"):
        self.scheduler = scheduler
        self.flow = flow
        self.prediction_type = prediction_type
        self.timesteps = scheduler.timesteps

    def initial(self, latents: torch.Tensor) -> torch.Tensor:
        """`x_T` from unit Gaussian latents (scaled by the scheduler's initial sigma)."""
        return latents * getattr(self.scheduler, "init_noise_sigma", 1.0)

    def model_input(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """The denoiser's input at step `step` (diffusion schedulers may scale `x`)."""
        if self.flow:
            return x
        return self.scheduler.scale_model_input(x, self.timesteps[step])

    def step(self, guided: torch.Tensor, step: int, x: torch.Tensor) -> torch.Tensor:
        """`x` at step `step + 1` from the guided prediction at step `step`."""
        return self.scheduler.step(guided, self.timesteps[step], x, return_dict=False)[0]

    def score_scale(self, space: str, step: int) -> float:
        """Factor turning a difference of two denoiser outputs at one `x_t` into one in `space`.

        `model`: the raw output (1). `epsilon`: for diffusion models per prediction type
        (v: `sqrt(abar)`; x0: `sqrt(abar / (1 - abar))`); for flow matching, with
        `x_t = (1 - s) x0 + s eps` and `v = eps - x0`, `eps = x_t + (1 - s) v`, so the factor is
        `1 - sigma` (zero at the first step, where sigma = 1).
        """
        if space == "model":
            return 1.0
        if space != "epsilon":
            raise MemscanError(f"unknown score space {space!r} (use {', '.join(SCORE_SPACES)})")
        if self.flow:
            return 1.0 - float(self.scheduler.sigmas[step])
        alpha_bar = float(self.scheduler.alphas_cumprod[int(self.timesteps[step])])
        return epsilon_scale(self.prediction_type, alpha_bar)


def epsilon_scale(prediction_type: str, alpha_bar: float) -> float:
    """Factor that turns a difference of two diffusion-model outputs at one `x_t` into one of epsilons."""
    if prediction_type == "epsilon":
        return 1.0
    if prediction_type == "v_prediction":  # eps = sqrt(ab) * v + sqrt(1 - ab) * x_t
        return alpha_bar**0.5
    if prediction_type == "sample":  # eps = (x_t - sqrt(ab) * x0) / sqrt(1 - ab)
        return (alpha_bar / (1.0 - alpha_bar)) ** 0.5
    raise MemscanError(f"unsupported prediction_type {prediction_type!r}")


class TextEncoderModule(torch.nn.Module):
    """A text encoder called as its family calls it: `(input_ids [B, L], attention_mask [B, L] | None)` -> `output_names`.

    What engines run for a text encoder (`DenoiserEngine.text_encoder`), as `Family.denoiser_module`
    is for the denoiser: only the outputs the family takes leave it.
    """

    def __init__(self, encoder: torch.nn.Module, output_names: tuple[str, ...]):
        super().__init__()
        self.encoder = encoder
        self.output_names = output_names

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """The encoder's `output_names` for the ids (and mask), in that order."""
        out = self.encoder(
            input_ids, attention_mask=attention_mask, output_hidden_states=PENULTIMATE in self.output_names, return_dict=True
        )
        return tuple(out.hidden_states[-2] if name == PENULTIMATE else getattr(out, name) for name in self.output_names)


class Family(ABC):
    """A loaded model of one family: its text encoders, its denoiser, its sampler.

    Subclasses set the class attributes and implement `load`, `conditioning`, `denoiser_module`,
    `schedule`, `latent_shape` and `pipeline`; everything else is shared.
    """

    name: ClassVar[str]  # short name, recorded with every result ("sd", "sdxl", ...)
    pipelines: ClassVar[tuple[str, ...]]  # model_index.json `_class_name`s handled
    flow: ClassVar[bool] = False  # flow matching (velocity) rather than diffusion
    # The CFG scale of walked windows and generation unless one is given: the pipeline's own default.
    default_guidance_scale: ClassVar[float]
    # The conditioning entry holding the per-token sequence (explain's gradient, mitigation),
    # the entries mitigation optimizes, and how many leading positions stay fixed (BOS).
    sequence_key: ClassVar[str] = "encoder_hidden_states"
    trainable_keys: ClassVar[tuple[str, ...]] = ("encoder_hidden_states",)
    frozen_positions: ClassVar[int] = 1
    pooled_key: ClassVar[str | None] = None  # the pooled embedding's entry, the pipeline's `pooled_prompt_embeds`
    denoiser_folder: ClassVar[str] = "unet"
    # What `conditioning` takes from each text encoder (by folder name), in order; absent encoders are skipped.
    text_encoder_outputs: ClassVar[dict[str, tuple[str, ...]]]
    # The pipeline folders the model is made of, in fingerprint order (absent ones are skipped).
    components: ClassVar[tuple[str, ...]]

    def __init__(
        self,
        path: Path,
        tokenizers: dict[str, PromptTokenizer],
        text_encoders: dict[str, torch.nn.Module | None],
        denoiser: torch.nn.Module,
        scheduler_config: dict,
        pipeline_config: dict,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.path = path
        self.tokenizers = tokenizers
        self.text_encoders = text_encoders
        self.denoiser = denoiser
        self.scheduler_config = scheduler_config
        self.pipeline_config = pipeline_config
        self.device = device
        self.dtype = dtype
        self._unconditional: Conditioning | None = None
        self._vae: torch.nn.Module | None = None

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def load(cls, path: Path, index: dict, device: torch.device, dtype: torch.dtype) -> Family:
        """Load the family's text encoders and denoiser from a pipeline folder."""

    @classmethod
    def check(cls, path: Path, index: dict) -> None:
        """Refuse variants of the family's pipeline that the scanner cannot score (default: none)."""

    def with_own_tokenizers(self) -> Family:
        """The same model (weights shared) with private tokenizer copies, for a second thread.

        A fast tokenizer must not be entered from two threads at once.
        """
        twin = copy.copy(self)
        twin.tokenizers = copy.deepcopy(self.tokenizers)
        return twin

    def modules(self) -> list[torch.nn.Module]:
        """Every loaded torch module (text encoders and denoiser)."""
        return [m for m in (*self.text_encoders.values(), self.denoiser) if m is not None]

    def vae(self) -> torch.nn.Module:
        """The VAE, loaded on first use (scans never need it)."""
        if self._vae is None:
            from diffusers import AutoencoderKL

            folder = self.path / "vae"
            if not folder.is_dir():
                raise MemscanError(f"{self.path}: the model has no vae/, so it cannot generate images")
            self._vae = load_component(AutoencoderKL, folder, self.dtype, self.device)
        return self._vae

    # -- text --------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> PromptTokenizer:
        """The tokenizer whose positions make up `sequence_key` (words, token counts, truncation)."""
        return next(iter(self.tokenizers.values()))

    def preprocess(self, prompt: str) -> str:
        """The text the pipeline tokenizes for `prompt` (default: the prompt itself)."""
        return prompt

    def tokenize(self, prompts: Sequence[str]) -> TokenizedPrompts:
        """Every tokenizer's padded ids; token counts and truncation from the primary (first) one."""
        return tokenize_with(self.tokenizers, [self.preprocess(p) for p in prompts])

    def text_encoder_modules(self) -> dict[str, TextEncoderModule]:
        """Each loaded text encoder as `encode_tokens` calls it (what engines run), by folder name."""
        return {
            name: TextEncoderModule(encoder, self.text_encoder_outputs[name])
            for name, encoder in self.text_encoders.items()
            if encoder is not None
        }

    def uses_attention_mask(self, encoder: str) -> bool:
        """Whether the pipeline passes the text encoder `encoder` the prompt's attention mask (default: no)."""
        return False

    def text_encoder_inputs(self, tokens: TokenizedPrompts) -> dict[str, dict[str, torch.Tensor]]:
        """Each loaded text encoder's keyword inputs: its tokenizer's ids (`tokenizer_2` for `text_encoder_2`, ...),
        and the attention mask where the pipeline passes one."""
        inputs = {}
        for name, encoder in self.text_encoders.items():
            if encoder is None:
                continue
            tokenizer = "tokenizer" + name.removeprefix("text_encoder")
            ids = torch.as_tensor(tokens.ids[tokenizer]).to(self.device, non_blocking=True)  # pinned on CUDA: no sync
            inputs[name] = {"input_ids": ids}
            if self.uses_attention_mask(name):
                inputs[name]["attention_mask"] = self.tokenizers[tokenizer].attention_mask(ids)
        return inputs

    def encode_tokens(self, tokens: TokenizedPrompts, encoders: Mapping[str, TextEncoder] | None = None) -> Conditioning:
        """The denoiser's text conditioning for tokenized prompts, as the pipeline builds it.

        `encoders` run the text encoders by name (an engine's, `Scanner.encode_tokens`); default: the eager modules.
        """
        encoders = self.text_encoder_modules() if encoders is None else encoders
        inputs = self.text_encoder_inputs(tokens)
        return self.conditioning({name: encoders[name](**x) for name, x in inputs.items()}, inputs)

    @abstractmethod
    def conditioning(
        self, outputs: dict[str, tuple[torch.Tensor, ...]], inputs: dict[str, dict[str, torch.Tensor]]
    ) -> Conditioning:
        """The conditioning from each loaded text encoder's `text_encoder_outputs` (and its inputs), as the pipeline joins them."""

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        """`encode_tokens(tokenize(prompts))`."""
        return self.encode_tokens(self.tokenize(prompts))

    def unconditional(self) -> Conditioning:
        """The unconditional branch's conditioning, `[1, ...]`, computed once."""
        if self._unconditional is None:
            with torch.no_grad():
                self._unconditional = self.encode_unconditional()
        return self._unconditional

    def encode_unconditional(self) -> Conditioning:
        """The pipeline's negative-prompt conditioning for the empty prompt (default: encode "")."""
        return self.encode([""])

    # -- denoiser and sampler ------------------------------------------------------------------
    @abstractmethod
    def denoiser_module(self) -> torch.nn.Module:
        """`forward(sample [R, C, H, W], timestep [], **conditioning) -> [R, C, H, W]`, the raw output."""

    @abstractmethod
    def schedule(self, num_inference_steps: int) -> Trajectory:
        """A fresh trajectory of `num_inference_steps` steps, as the pipeline sets its timesteps."""

    @property
    @abstractmethod
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one latent at the pipeline's default resolution."""

    @classmethod
    def default_score_space(cls) -> str:
        """Where scores are taken unless asked otherwise: epsilon for diffusion, the velocity for flows."""
        return "model" if cls.flow else "epsilon"

    # -- generation -----------------------------------------------------------------------------
    @abstractmethod
    def pipeline(self, scheduler: Any = None) -> Any:
        """The family's diffusers pipeline over the loaded components (VAE loaded on demand)."""

    def pipeline_embeds(self, cond: Conditioning, uncond: Conditioning) -> dict[str, torch.Tensor]:
        """The pipeline's `prompt_embeds`, `negative_prompt_embeds` (and pooled ones, where the family has them)."""
        embeds = {"prompt_embeds": cond[self.sequence_key], "negative_prompt_embeds": uncond[self.sequence_key]}
        if self.pooled_key is not None:
            embeds.update(pooled_prompt_embeds=cond[self.pooled_key], negative_pooled_prompt_embeds=uncond[self.pooled_key])
        return embeds

    def generation_kwargs(
        self, cond: Conditioning, uncond: Conditioning, latents: torch.Tensor, guidance_scale: float
    ) -> dict[str, Any]:
        """The pipeline call's arguments for CFG generation from `latents [S, C, H, W]` (rows of `cond`, `uncond`)."""
        return {**self.pipeline_embeds(cond, uncond), "latents": latents, "guidance_scale": guidance_scale}


def check_width(path: Path, encoder: str, width: int, denoiser: str, expected: int) -> None:
    """Refuse a text encoder whose output width is not the one the denoiser takes."""
    if width != expected:
        raise MemscanError(f"{path}: the {encoder} width {width} does not match the denoiser's {denoiser} {expected}")


def _one_line(folder: Path, what: str, exc: Exception) -> MemscanError:
    return MemscanError(f"{folder}: could not load {what}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")


def load_component(cls: Any, folder: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """`cls.from_pretrained(folder)` (diffusers or transformers) on `device` in `dtype`, frozen.

    Safetensors weights only: a folder of pickled `.bin` weights would run code when loaded.
    """
    # transformers names the argument `dtype`, diffusers `torch_dtype`.
    dtype_arg = "dtype" if cls.__module__.startswith("transformers") else "torch_dtype"
    try:
        module = cls.from_pretrained(folder, use_safetensors=True, **{dtype_arg: dtype})
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise _one_line(folder, cls.__name__, exc) from exc
    return module.to(device).eval().requires_grad_(False)


def load_tokenizer(folder: Path) -> Any:
    """`AutoTokenizer.from_pretrained(folder)`, errors in one line."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise _one_line(folder, "the tokenizer", exc) from exc
