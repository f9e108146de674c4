"""SD 1.x / 2.x (`StableDiffusionPipeline`): one CLIP text encoder, a cross-attention UNet, DDIM.

The prompt's conditioning is the text encoder's last hidden state; the unconditional one is
the encoding of "" (the pipeline's default negative prompt). Scores are taken in epsilon space
by default (v-prediction and sample outputs converted), or on the raw UNet output.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..encode import PromptTokenizer
from ..errors import MemscanError
from .base import Conditioning, Family, Trajectory, check_width, load_component, load_tokenizer, read_json


class UNetDenoiser(torch.nn.Module):
    """A `UNet2DConditionModel` as a denoiser: `(sample, timestep, encoder_hidden_states, **added)`.

    Keyword arguments besides `encoder_hidden_states` are the UNet's `added_cond_kwargs` (SDXL).
    """

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, **added) -> torch.Tensor:
        """The UNet's raw output `[R, C, H, W]`."""
        return self.unet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added or None, return_dict=False
        )[0]


def check_unet(path: Path, added: bool = False) -> dict:
    """The UNet's config, refused unless it is a text-conditioned `UNet2DConditionModel` (with added conditions iff `added`)."""
    config = read_json(path / "unet" / "config.json")
    if config.get("_class_name") != "UNet2DConditionModel" or not config.get("cross_attention_dim"):
        raise MemscanError(
            f"{path}: the UNet is {config.get('_class_name', 'unknown')}; memscan needs a "
            "text-conditioned UNet2DConditionModel (cross-attention, classifier-free guidance)"
        )
    if not added and config.get("addition_embed_type"):
        raise MemscanError(f"{path}: UNets with added conditions ({config['addition_embed_type']}) are not supported here")
    return config


class DDIMTrajectoryMixin:
    """Diffusion families scored on the DDIM trajectory built from the model's scheduler config."""

    scheduler_config: dict
    device: torch.device

    def schedule(self, num_inference_steps: int) -> Trajectory:
        """DDIM from the model's scheduler config, `num_inference_steps` steps."""
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        return Trajectory(scheduler, flow=False, prediction_type=self.scheduler_config.get("prediction_type", "epsilon"))

    def generation_scheduler(self):
        """The scheduler generation uses: DDIM, as the scores' trajectory."""
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self.scheduler_config)


class StableDiffusion(DDIMTrajectoryMixin, Family):
    """SD 1.x / 2.x."""

    name = "sd"
    pipelines = ("StableDiffusionPipeline",)
    default_guidance_scale = 7.5  # StableDiffusionPipeline's
    components = ("tokenizer", "text_encoder", "unet", "scheduler", "vae")
    text_encoder_outputs = {"text_encoder": ("last_hidden_state",)}

    @classmethod
    def check(cls, path: Path, index: dict) -> None:
        """Refuse a second text encoder or a UNet without text cross-attention."""
        missing = [c for c in ("tokenizer", "text_encoder", "unet", "scheduler") if not (path / c).is_dir()]
        if missing:
            raise MemscanError(f"{path}: not a Stable Diffusion pipeline folder (missing {', '.join(missing)}/)")
        check_unet(path)

    @classmethod
    def load(cls, path: Path, index: dict, device: torch.device, dtype: torch.dtype) -> StableDiffusion:
        """Tokenizer, CLIP text encoder and UNet from `path`."""
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        tokenizer = load_tokenizer(path / "tokenizer")
        text_encoder = load_component(CLIPTextModel, path / "text_encoder", dtype, device)
        unet = load_component(UNet2DConditionModel, path / "unet", dtype, device)
        check_width(path, "text encoder", text_encoder.config.hidden_size, "cross_attention_dim", unet.config.cross_attention_dim)
        scheduler_config = dict(read_json(path / "scheduler" / "scheduler_config.json"))
        return cls(path, {"tokenizer": PromptTokenizer(tokenizer)}, {"text_encoder": text_encoder}, unet,
                   scheduler_config, index, device, dtype)

    def uses_attention_mask(self, encoder: str) -> bool:
        """As the pipeline decides: when the text encoder's config asks for one."""
        return bool(getattr(self.text_encoders[encoder].config, "use_attention_mask", False))

    def conditioning(self, outputs: dict[str, tuple[torch.Tensor, ...]], inputs: dict) -> Conditioning:
        """`{"encoder_hidden_states": [B, 77, D]}`: the text encoder's last hidden state."""
        (hidden,) = outputs["text_encoder"]
        return {"encoder_hidden_states": hidden.to(self.denoiser.dtype)}  # the dtype the denoiser runs in

    def denoiser_module(self) -> torch.nn.Module:
        """The UNet called as the pipeline calls it."""
        return UNetDenoiser(self.denoiser)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one latent at the UNet's native resolution."""
        cfg = self.denoiser.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return (cfg.in_channels, size, size)

    def pipeline(self, scheduler=None):
        """A `StableDiffusionPipeline` over the loaded components (DDIM unless given)."""
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=self.vae(),
            text_encoder=self.text_encoders["text_encoder"],
            tokenizer=self.tokenizer.tokenizer,
            unet=self.denoiser,
            scheduler=scheduler or self.generation_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe
