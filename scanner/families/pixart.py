"""PixArt-α / PixArt-Σ (`PixArtAlphaPipeline`, `PixArtSigmaPipeline`): T5, a DiT with learned sigma, DDIM.

As the pipelines' `encode_prompt` does it (`clean_caption=False`): the prompt lowercased and
stripped, T5-tokenized to `max_sequence_length` (120 for α, 300 for Σ), encoded with its
attention mask, and the mask passed on to the transformer (`encoder_attention_mask`, part of
the conditioning). The unconditional branch is the encoding of "" at the same length. The
transformer predicts epsilon and a variance in 8 channels; the score takes the epsilon half,
as the pipelines step on. α at 1024 px (`sample_size` 128) conditions on the resolution and
aspect ratio of the default size (which the pipeline's resolution binning leaves as it is);
Σ and the other sizes pass none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..encode import PromptTokenizer
from ..errors import MemscanError
from .base import Conditioning, Family, check_width, load_component, load_tokenizer, read_json
from .stable_diffusion import DDIMTrajectoryMixin

MAX_SEQUENCE_LENGTH = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}  # the pipelines' defaults
ADDED_CONDITIONS_SAMPLE_SIZE = 128  # PixArt-α passes resolution and aspect ratio only at this size


class PixArtDenoiser(torch.nn.Module):
    """A `PixArtTransformer2DModel` as the pipeline calls it; returns the epsilon half of a learned-sigma output."""

    def __init__(self, transformer: torch.nn.Module, size: int | None, dtype: torch.dtype, device: torch.device):
        """`size`: the square image size whose resolution and aspect ratio condition the model (None: none do)."""
        super().__init__()
        self.transformer = transformer
        resolution = aspect_ratio = None
        if size is not None:
            resolution = torch.tensor([[size, size]], dtype=dtype, device=device)
            aspect_ratio = torch.tensor([[1.0]], dtype=dtype, device=device)
        self.register_buffer("resolution", resolution, persistent=False)
        self.register_buffer("aspect_ratio", aspect_ratio, persistent=False)
        config = transformer.config
        self.channels = config.in_channels
        self.learned_sigma = config.out_channels // 2 == config.in_channels

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor) -> torch.Tensor:
        """The epsilon prediction `[R, C, H, W]`."""
        rows = sample.shape[0]  # not len(): the ONNX tracer keeps a traced size dynamic
        added: dict[str, torch.Tensor | None] = {"resolution": None, "aspect_ratio": None}
        if self.resolution is not None:  # in the prompt embeddings' dtype, one row per model row, as the pipeline has them
            dtype = encoder_hidden_states.dtype
            added = {"resolution": self.resolution.to(dtype).expand(rows, -1),
                     "aspect_ratio": self.aspect_ratio.to(dtype).expand(rows, -1)}
        out = self.transformer(
            sample,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            timestep=timestep.reshape(1).expand(rows),  # the pipeline's timestep expansion to [R]
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
        return out[:, : self.channels] if self.learned_sigma else out


class PixArt(DDIMTrajectoryMixin, Family):
    """PixArt-α and PixArt-Σ."""

    name = "pixart"
    pipelines = tuple(MAX_SEQUENCE_LENGTH)
    default_guidance_scale = 4.5  # PixArtAlphaPipeline's and PixArtSigmaPipeline's
    components = ("tokenizer", "text_encoder", "transformer", "scheduler", "vae")
    denoiser_folder = "transformer"
    frozen_positions = 0  # T5 has no BOS: every position is the prompt's
    text_encoder_outputs = {"text_encoder": ("last_hidden_state",)}

    @classmethod
    def check(cls, path: Path, index: dict) -> None:
        """Refuse missing components and a transformer other than `PixArtTransformer2DModel`."""
        missing = [f for f in ("tokenizer", "text_encoder", "transformer", "scheduler") if not (path / f).is_dir()]
        if missing:
            raise MemscanError(f"{path}: not a PixArt pipeline folder (missing {', '.join(f + '/' for f in missing)})")
        config = read_json(path / "transformer" / "config.json")
        if config.get("_class_name") != "PixArtTransformer2DModel":
            raise MemscanError(
                f"{path}: the transformer is {config.get('_class_name', 'unknown')}; PixArt's is PixArtTransformer2DModel"
            )

    @classmethod
    def load(cls, path: Path, index: dict, device: torch.device, dtype: torch.dtype) -> PixArt:
        """The T5 tokenizer and encoder and the transformer from `path`."""
        from diffusers import PixArtTransformer2DModel
        from transformers import T5EncoderModel

        max_length = MAX_SEQUENCE_LENGTH[index.get("_class_name", "PixArtAlphaPipeline")]
        tokenizer = PromptTokenizer(load_tokenizer(path / "tokenizer"), name="tokenizer", max_length=max_length)
        text_encoder = load_component(T5EncoderModel, path / "text_encoder", dtype, device)
        transformer = load_component(PixArtTransformer2DModel, path / "transformer", dtype, device)
        check_width(path, "T5", text_encoder.config.d_model, "caption_channels", transformer.config.caption_channels)
        scheduler_config = dict(read_json(path / "scheduler" / "scheduler_config.json"))
        return cls(path, {"tokenizer": tokenizer}, {"text_encoder": text_encoder}, transformer, scheduler_config, index,
                   device, dtype)

    @property
    def sigma(self) -> bool:
        """True for PixArt-Σ."""
        return self.pipeline_config.get("_class_name") == "PixArtSigmaPipeline"

    def preprocess(self, prompt: str) -> str:
        """The prompt as the pipeline preprocesses it without caption cleaning: lowercased, stripped."""
        return prompt.lower().strip()

    def uses_attention_mask(self, encoder: str) -> bool:
        """Always: the pipelines encode with the prompt's mask (and pass it on to the transformer)."""
        return True

    def conditioning(self, outputs: dict[str, tuple[torch.Tensor, ...]], inputs: dict) -> Conditioning:
        """`encoder_hidden_states [B, L, D]` (T5's last hidden state, masked) and `encoder_attention_mask [B, L]`, int64."""
        (hidden,) = outputs["text_encoder"]
        return {"encoder_hidden_states": hidden.to(self.dtype), "encoder_attention_mask": inputs["text_encoder"]["attention_mask"]}

    def denoiser_module(self) -> torch.nn.Module:
        """The transformer called as the pipeline calls it at its default size."""
        conditioned = not self.sigma and self.denoiser.config.sample_size == ADDED_CONDITIONS_SAMPLE_SIZE
        size = self.latent_shape[1] * self.vae_scale_factor if conditioned else None
        return PixArtDenoiser(self.denoiser, size, self.dtype, self.device)

    @property
    def vae_scale_factor(self) -> int:
        """The pipeline's: from the VAE's config, 8 without one."""
        vae_config = self.path / "vae" / "config.json"
        return 2 ** (len(read_json(vae_config)["block_out_channels"]) - 1) if vae_config.is_file() else 8

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one latent at the transformer's native resolution."""
        cfg = self.denoiser.config
        return (cfg.in_channels, cfg.sample_size, cfg.sample_size)

    def pipeline(self, scheduler=None):
        """The model's `PixArtAlphaPipeline` or `PixArtSigmaPipeline` over the loaded components (DDIM unless given)."""
        from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline

        pipe = (PixArtSigmaPipeline if self.sigma else PixArtAlphaPipeline)(
            tokenizer=self.tokenizer.tokenizer,
            text_encoder=self.text_encoders["text_encoder"],
            vae=self.vae(),
            transformer=self.denoiser,
            scheduler=scheduler or self.generation_scheduler(),
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipeline_embeds(self, cond: Conditioning, uncond: Conditioning) -> dict[str, torch.Tensor]:
        """`prompt_embeds`, `prompt_attention_mask` and their negatives."""
        return {
            "prompt_embeds": cond["encoder_hidden_states"],
            "prompt_attention_mask": cond["encoder_attention_mask"],
            "negative_prompt_embeds": uncond["encoder_hidden_states"],
            "negative_prompt_attention_mask": uncond["encoder_attention_mask"],
        }

    def generation_kwargs(
        self, cond: Conditioning, uncond: Conditioning, latents: torch.Tensor, guidance_scale: float
    ) -> dict[str, Any]:
        """The base arguments, plus what the PixArt pipelines need to take them.

        `negative_prompt=None`: its default "" may not come with `negative_prompt_embeds`. No resolution
        binning: the default size is its own bin, and binning refuses sample sizes without a bin table.
        """
        base = super().generation_kwargs(cond, uncond, latents, guidance_scale)
        return {**base, "negative_prompt": None, "use_resolution_binning": False}
