"""SDXL base (`StableDiffusionXLPipeline`): two CLIP text encoders, a UNet with added text-time conditions, DDIM.

As the pipeline's `encode_prompt` builds it: the penultimate hidden states of both encoders
(`CLIPTextModel`, `CLIPTextModelWithProjection`) concatenated on the feature dim, and the
second encoder's projected pooled output as the UNet's `text_embeds`. The `time_ids` are the
pipeline's defaults, `(h, w, 0, 0, h, w)` at its default size `h = w = sample_size * vae
scale factor`, a constant of the denoiser. The unconditional branch is zeros for both when
the pipeline's `force_zeros_for_empty_prompt` is set (its default), the encoding of "" otherwise.
The refiner (aesthetic-score time ids, only the second encoder) is refused.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch

from ..encode import PromptTokenizer
from ..errors import MemscanError
from .base import PENULTIMATE, Conditioning, Family, check_width, load_component, load_tokenizer, read_json
from .stable_diffusion import DDIMTrajectoryMixin, StableDiffusion, UNetDenoiser, check_unet

FOLDERS = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "unet", "scheduler")


class SDXLUNetDenoiser(UNetDenoiser):
    """The SDXL UNet as the pipeline calls it: `(sample, timestep, encoder_hidden_states, text_embeds)`, `time_ids` fixed."""

    def __init__(self, unet: torch.nn.Module, time_ids: torch.Tensor):
        super().__init__(unet)
        self.register_buffer("time_ids", time_ids, persistent=False)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor) -> torch.Tensor:
        """The UNet's raw output `[R, C, H, W]`."""
        # The pipeline builds time_ids in the prompt embeddings' dtype, one row per UNet row.
        # shape[0], not len(): the ONNX tracer keeps the batch axis of a size it can see.
        time_ids = self.time_ids.to(text_embeds.dtype).expand(sample.shape[0], -1)
        return super().forward(sample, timestep, encoder_hidden_states, text_embeds=text_embeds, time_ids=time_ids)


def _absent(path: Path, index: dict, folder: str) -> bool:
    """True when the pipeline has no `folder` component (null in model_index.json, or no folder)."""
    entry = index.get(folder)
    return (isinstance(entry, list) and entry[:1] == [None]) or not (path / folder).is_dir()


class StableDiffusionXL(DDIMTrajectoryMixin, Family):
    """SDXL base models."""

    name = "sdxl"
    pipelines = ("StableDiffusionXLPipeline",)
    default_guidance_scale = 5.0  # StableDiffusionXLPipeline's
    components = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "unet", "scheduler", "vae")
    trainable_keys = ("encoder_hidden_states", "text_embeds")  # the token embeddings and the pooled one
    frozen_positions = 1  # CLIP's BOS leads the sequence
    pooled_key = "text_embeds"
    text_encoder_outputs = {"text_encoder": (PENULTIMATE,), "text_encoder_2": (PENULTIMATE, "text_embeds")}

    @classmethod
    def check(cls, path: Path, index: dict) -> None:
        """Refuse the refiner, missing components and UNets that are not SDXL's text-time kind."""
        if index.get("requires_aesthetics_score"):
            raise MemscanError(
                f"{path}: an SDXL refiner (requires_aesthetics_score): its UNet is conditioned on an aesthetic "
                "score and refines an input image; memscan scores text-to-image base models"
            )
        if _absent(path, index, "text_encoder") and not _absent(path, index, "text_encoder_2"):
            raise MemscanError(
                f"{path}: only text_encoder_2 is present, as in an SDXL refiner (an image-to-image model); "
                "memscan scores SDXL base models with both text encoders"
            )
        missing = [f for f in FOLDERS if _absent(path, index, f)]
        if missing:
            raise MemscanError(f"{path}: not an SDXL pipeline folder (missing {', '.join(f + '/' for f in missing)})")
        config = check_unet(path, added=True)
        if config.get("addition_embed_type") != "text_time":
            raise MemscanError(
                f"{path}: the UNet's addition_embed_type is {config.get('addition_embed_type')!r}; SDXL's is 'text_time'"
            )
        if config.get("time_cond_proj_dim") is not None:
            raise MemscanError(
                f"{path}: the UNet takes a guidance-scale embedding (time_cond_proj_dim, an LCM-distilled model), "
                "so its prediction is not the classifier-free pair memscan scores"
            )

    @classmethod
    def load(cls, path: Path, index: dict, device: torch.device, dtype: torch.dtype) -> StableDiffusionXL:
        """Both tokenizers and CLIP text encoders and the UNet from `path`."""
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        tokenizers = {name: PromptTokenizer(load_tokenizer(path / name), name=name) for name in ("tokenizer", "tokenizer_2")}
        encoders = {
            "text_encoder": load_component(CLIPTextModel, path / "text_encoder", dtype, device),
            "text_encoder_2": load_component(CLIPTextModelWithProjection, path / "text_encoder_2", dtype, device),
        }
        unet = load_component(UNet2DConditionModel, path / "unet", dtype, device)
        width = sum(e.config.hidden_size for e in encoders.values())
        check_width(path, "text encoders' summed", width, "cross_attention_dim", unet.config.cross_attention_dim)
        # The check the pipeline makes in _get_add_time_ids: six time ids and the pooled projection.
        passed = unet.config.addition_time_embed_dim * 6 + encoders["text_encoder_2"].config.projection_dim
        expected = unet.add_embedding.linear_1.in_features
        if passed != expected:
            raise MemscanError(
                f"{path}: the UNet expects an added embedding of {expected} features, but six time ids and the "
                f"pooled projection make {passed} (a refiner-style UNet, or mismatched components)"
            )
        scheduler_config = dict(read_json(path / "scheduler" / "scheduler_config.json"))
        return cls(path, tokenizers, encoders, unet, scheduler_config, index, device, dtype)

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        """The pipeline's setting (its default when model_index.json does not say)."""
        return bool(self.pipeline_config.get("force_zeros_for_empty_prompt", True))

    @cached_property
    def image_size(self) -> int:
        """The pipeline's default height and width: the UNet's sample size times the VAE's scale factor."""
        vae_config = self.path / "vae" / "config.json"
        # The pipeline's own fallback when it has no VAE is a factor of 8.
        factor = 2 ** (len(read_json(vae_config)["block_out_channels"]) - 1) if vae_config.is_file() else 8
        return self.latent_shape[1] * factor

    def conditioning(self, outputs: dict[str, tuple[torch.Tensor, ...]], inputs: dict) -> Conditioning:
        """`encoder_hidden_states [B, 77, D1 + D2]` (penultimate layers) and `text_embeds [B, P]` (the second encoder's
        pooled projection)."""
        (hidden_1,), (hidden_2, pooled) = outputs["text_encoder"], outputs["text_encoder_2"]
        return {"encoder_hidden_states": torch.cat([hidden_1, hidden_2], dim=-1).to(self.dtype), "text_embeds": pooled.to(self.dtype)}

    def encode_unconditional(self) -> Conditioning:
        """Zeros in the shape of the encoding of "" with `force_zeros_for_empty_prompt`, that encoding otherwise."""
        empty = self.encode([""])
        return {k: torch.zeros_like(v) for k, v in empty.items()} if self.force_zeros_for_empty_prompt else empty

    def denoiser_module(self) -> torch.nn.Module:
        """The UNet called as the pipeline calls it at its default size."""
        size = self.image_size
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=self.dtype, device=self.device)
        return SDXLUNetDenoiser(self.denoiser, time_ids)

    latent_shape = StableDiffusion.latent_shape  # the UNet's native resolution, as for SD 1.x/2.x

    def pipeline(self, scheduler=None):
        """A `StableDiffusionXLPipeline` over the loaded components (DDIM unless given, no watermark)."""
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(
            vae=self.vae(),
            text_encoder=self.text_encoders["text_encoder"],
            text_encoder_2=self.text_encoders["text_encoder_2"],
            tokenizer=self.tokenizers["tokenizer"].tokenizer,
            tokenizer_2=self.tokenizers["tokenizer_2"].tokenizer,
            unet=self.denoiser,
            scheduler=scheduler or self.generation_scheduler(),
            force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt,
            add_watermarker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe
