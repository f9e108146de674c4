"""Flux (`FluxPipeline`): CLIP (pooled) + T5 (sequence), a guidance-distilled MMDiT, flow matching.

Flux samples without an unconditional branch; the score is the conditional-minus-empty-prompt
velocity as diffusers' true-CFG path computes it (`negative_prompt=""`, encoded like the
prompt, `neg + true_cfg_scale * (cond - neg)`), with the distilled guidance embedding at the
pipeline's default. It is the same quantity as for models trained with CFG dropout, on a model
that was not, so how well it detects memorization is unknown. The transformer works on 2 x 2
patches packed into a sequence; the denoiser module packs and unpacks, so everything outside
sees latents `[R, C, H, W]`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..encode import PromptTokenizer
from .base import Conditioning, Family, Trajectory, check_width, load_component, load_tokenizer, read_json
from .sd3 import check_flow_folder, flow_scheduler

T5_MAX_LENGTH = 512  # FluxPipeline's default max_sequence_length
GUIDANCE = 3.5  # FluxPipeline's default guidance_scale: the distilled guidance embedding's input
DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size: the default image is this times the VAE factor


def pack(latents: torch.Tensor) -> torch.Tensor:
    """Latents `[R, C, H, W]` as the pipeline packs them: `[R, H/2 * W/2, 4C]`."""
    from diffusers import FluxPipeline

    return FluxPipeline._pack_latents(latents, *latents.shape)


class FluxDenoiser(torch.nn.Module):
    """A `FluxTransformer2DModel` called as the pipeline calls it, on unpacked latents."""

    def __init__(self, transformer: torch.nn.Module, text_dtype: torch.dtype):
        super().__init__()
        self.transformer = transformer
        self.text_dtype = text_dtype  # the dtype of the pipeline's txt_ids

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, pooled_projections: torch.Tensor
    ) -> torch.Tensor:
        """The transformer's raw velocity, unpacked to `[R, C, H, W]`."""
        from diffusers import FluxPipeline

        rows, channels, height, width = sample.shape
        img_ids = FluxPipeline._prepare_latent_image_ids(rows, height // 2, width // 2, sample.device, sample.dtype)
        txt_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=sample.device, dtype=self.text_dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([1], GUIDANCE, device=sample.device, dtype=torch.float32).expand(rows)
        out = self.transformer(
            hidden_states=pack(sample),
            timestep=timestep.expand(rows).to(sample.dtype) / 1000,
            guidance=guidance,
            pooled_projections=pooled_projections,
            encoder_hidden_states=encoder_hidden_states,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        # Sizes in latent pixels, so the VAE factor of the unpacking is 1.
        return FluxPipeline._unpack_latents(out, height, width, 1)


class Flux(Family):
    """Flux.1 (dev: guidance-distilled; schnell: no guidance embedding)."""

    name = "flux"
    pipelines = ("FluxPipeline",)
    flow = True
    # FluxPipeline's true_cfg_scale: 1, true CFG off, so walked windows follow the conditional velocity as it samples.
    default_guidance_scale = 1.0
    # T5's sequence (no BOS: nothing frozen) and CLIP's pooled output, by the transformer's names.
    sequence_key = "encoder_hidden_states"
    trainable_keys = ("encoder_hidden_states", "pooled_projections")
    frozen_positions = 0
    pooled_key = "pooled_projections"
    denoiser_folder = "transformer"
    text_encoder_outputs = {"text_encoder": ("pooler_output",), "text_encoder_2": ("last_hidden_state",)}
    components = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "transformer", "scheduler", "vae")

    def __init__(self, *args, vae_scale_factor: int = 8, **kwargs):
        super().__init__(*args, **kwargs)
        self.vae_scale_factor = vae_scale_factor

    @classmethod
    def check(cls, path: Path, index: dict) -> None:
        """Refuse incomplete folders, other denoisers or schedulers."""
        check_flow_folder(
            path, ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "transformer", "scheduler"), "FluxTransformer2DModel"
        )

    @classmethod
    def load(cls, path: Path, index: dict, device: torch.device, dtype: torch.dtype) -> Flux:
        """CLIP, T5 and the transformer from `path`; the VAE's scale factor from its config."""
        from diffusers import FluxTransformer2DModel
        from transformers import CLIPTextModel, T5EncoderModel

        transformer = load_component(FluxTransformer2DModel, path / "transformer", dtype, device)
        # T5 first: its positions are the sequence (explain, mitigation, token counts).
        tokenizers = {
            "tokenizer_2": PromptTokenizer(load_tokenizer(path / "tokenizer_2"), name="tokenizer_2", max_length=T5_MAX_LENGTH),
            "tokenizer": PromptTokenizer(load_tokenizer(path / "tokenizer"), name="tokenizer"),
        }
        encoders = {
            "text_encoder": load_component(CLIPTextModel, path / "text_encoder", dtype, device),
            "text_encoder_2": load_component(T5EncoderModel, path / "text_encoder_2", dtype, device),
        }
        cfg = transformer.config
        check_width(path, "CLIP", encoders["text_encoder"].config.hidden_size, "pooled_projection_dim", cfg.pooled_projection_dim)
        check_width(path, "T5", encoders["text_encoder_2"].config.d_model, "joint_attention_dim", cfg.joint_attention_dim)
        # The pipeline's vae_scale_factor (8 when it has no VAE) sets its default resolution.
        vae_config = path / "vae" / "config.json"
        scale = 2 ** (len(read_json(vae_config)["block_out_channels"]) - 1) if vae_config.is_file() else 8
        scheduler_config = dict(read_json(path / "scheduler" / "scheduler_config.json"))
        return cls(path, tokenizers, encoders, transformer, scheduler_config, index, device, dtype, vae_scale_factor=scale)

    def conditioning(self, outputs: dict[str, tuple[torch.Tensor, ...]], inputs: dict) -> Conditioning:
        """`encoder_hidden_states [B, 512, D]` (T5's last hidden state) and `pooled_projections [B, P]` (CLIP's pooled output)."""
        clip, t5 = self.text_encoders["text_encoder"], self.text_encoders["text_encoder_2"]
        (pooled,), (sequence,) = outputs["text_encoder"], outputs["text_encoder_2"]
        return {"encoder_hidden_states": sequence.to(t5.dtype), "pooled_projections": pooled.to(clip.dtype)}

    def denoiser_module(self) -> torch.nn.Module:
        """The transformer called as the pipeline calls it, packing and unpacking the latents."""
        return FluxDenoiser(self.denoiser, self.text_encoders["text_encoder"].dtype)

    def schedule(self, num_inference_steps: int) -> Trajectory:
        """Flow matching Euler over the pipeline's sigmas `linspace(1, 1/n, n)`, shifted by `mu` of the image's sequence length."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        scheduler = flow_scheduler(self.scheduler_config)
        config = scheduler.config
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        _, height, width = self.latent_shape
        mu = calculate_shift(
            (height // 2) * (width // 2),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        # As retrieve_timesteps calls it: with sigmas, without the step count.
        if sigmas is None:
            scheduler.set_timesteps(num_inference_steps, device=self.device, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)
        scheduler.set_begin_index(0)
        return Trajectory(scheduler, flow=True)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) at the pipeline's default resolution (1024 px for the usual VAE)."""
        size = DEFAULT_SAMPLE_SIZE * self.vae_scale_factor
        side = 2 * (size // (self.vae_scale_factor * 2))
        return (self.denoiser.config.in_channels // 4, side, side)

    def pipeline(self, scheduler=None):
        """A `FluxPipeline` over the loaded components (flow matching Euler unless given)."""
        from diffusers import FluxPipeline

        pipe = FluxPipeline(
            scheduler=scheduler or flow_scheduler(self.scheduler_config),
            vae=self.vae(),
            text_encoder=self.text_encoders["text_encoder"],
            tokenizer=self.tokenizers["tokenizer"].tokenizer,
            text_encoder_2=self.text_encoders["text_encoder_2"],
            tokenizer_2=self.tokenizers["tokenizer_2"].tokenizer,
            transformer=self.denoiser,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def generation_kwargs(
        self, cond: Conditioning, uncond: Conditioning, latents: torch.Tensor, guidance_scale: float
    ) -> dict:
        """True CFG at `guidance_scale` from packed `latents`; the distilled guidance stays at its default."""
        return {**self.pipeline_embeds(cond, uncond), "latents": pack(latents), "true_cfg_scale": guidance_scale}
