"""SD 3 / 3.5 (`StableDiffusion3Pipeline`): CLIP-L + CLIP-G + T5, an MMDiT transformer, flow matching.

The conditioning is what the pipeline's `encode_prompt` builds: the joint sequence
`[CLIP-L || CLIP-G (penultimate hidden states, zero-padded to the T5 width) ; T5]` along the
sequence axis (CLIP's 77 positions first) and the pooled projection (both CLIPs' `text_embeds`
side by side). Without `text_encoder_3` the pipeline puts zeros where T5's states would be.
The unconditional branch is the encoding of "" (the pipeline's default negative prompt).
Scores are taken on the velocity by default (at the first step, where sigma = 1, its epsilon
difference is exactly zero; see `Trajectory.score_scale`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..encode import PromptTokenizer
from ..errors import MemscanError
from .base import PENULTIMATE, Conditioning, Family, Trajectory, check_width, load_component, load_tokenizer, read_json

T5_MAX_LENGTH = 256  # StableDiffusion3Pipeline's default max_sequence_length


def check_flow_folder(path: Path, folders: tuple[str, ...], transformer_class: str) -> dict:
    """The scheduler config of a flow pipeline folder, refused unless `folders` exist with the expected classes."""
    missing = [f for f in folders if not (path / f).is_dir()]
    if missing:
        raise MemscanError(f"{path}: not a complete pipeline folder (missing {', '.join(missing)}/)")
    found = read_json(path / "transformer" / "config.json").get("_class_name")
    if found != transformer_class:
        raise MemscanError(f"{path}: the transformer is {found or 'unknown'}; this pipeline needs {transformer_class}")
    config = read_json(path / "scheduler" / "scheduler_config.json")
    if config.get("_class_name") != "FlowMatchEulerDiscreteScheduler":
        raise MemscanError(
            f"{path}: the scheduler is {config.get('_class_name', 'unknown')}; memscan walks the pipeline's "
            "FlowMatchEulerDiscreteScheduler trajectory"
        )
    if config.get("stochastic_sampling"):
        # The scores' trajectory must be a function of the initial latents alone.
        raise MemscanError(f"{path}: the scheduler samples stochastically (stochastic_sampling), so scores would not be reproducible")
    return config


def flow_scheduler(config: dict):
    """A fresh `FlowMatchEulerDiscreteScheduler` from a scheduler config."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(config)


def present(path: Path, index: dict, folder: str) -> bool:
    """Whether the optional component `folder` is part of the pipeline (named in model_index.json and on disk)."""
    entry = index.get(folder, [None, None])
    return isinstance(entry, list) and entry[-1] is not None and (path / folder).is_dir()


class SD3Denoiser(torch.nn.Module):
    """An `SD3Transformer2DModel` called as the pipeline calls it (the timestep broadcast to the batch)."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, pooled_projections: torch.Tensor
    ) -> torch.Tensor:
        """The transformer's raw velocity `[R, C, H, W]`."""
        return self.transformer(
            hidden_states=sample,
            timestep=timestep.expand(sample.shape[0]),
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            return_dict=False,
        )[0]


class StableDiffusion3(Family):
    """SD 3 / 3.5, with or without the T5 encoder."""

    name = "sd3"
    pipelines = ("StableDiffusion3Pipeline",)
    flow = True
    default_guidance_scale = 7.0  # StableDiffusion3Pipeline's
    sequence_key = "encoder_hidden_states"
    # The joint sequence and the pooled projection; position 0 is CLIP's BOS.
    trainable_keys = ("encoder_hidden_states", "pooled_projections")
    frozen_positions = 1
    pooled_key = "pooled_projections"
    denoiser_folder = "transformer"
    # CLIP's clip_skip None: the penultimate hidden states, and the projected pooled outputs.
    text_encoder_outputs = {
        "text_encoder": (PENULTIMATE, "text_embeds"),
        "text_encoder_2": (PENULTIMATE, "text_embeds"),
        "text_encoder_3": ("last_hidden_state",),
    }
    components = (
        "tokenizer", "tokenizer_2", "tokenizer_3", "text_encoder", "text_encoder_2", "text_encoder_3",
        "transformer", "scheduler", "vae",
    )

    @classmethod
    def check(cls, path: Path, index: dict) -> None:
        """Refuse incomplete folders, other denoisers or schedulers, and a T5 encoder without its tokenizer."""
        check_flow_folder(
            path, ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "transformer", "scheduler"), "SD3Transformer2DModel"
        )
        if present(path, index, "text_encoder_3") and not present(path, index, "tokenizer_3"):
            raise MemscanError(f"{path}: text_encoder_3 is there but tokenizer_3 is not")

    @classmethod
    def load(cls, path: Path, index: dict, device: torch.device, dtype: torch.dtype) -> StableDiffusion3:
        """Both CLIP encoders, T5 (when the folder has it) and the transformer from `path`."""
        from diffusers import SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        transformer = load_component(SD3Transformer2DModel, path / "transformer", dtype, device)
        clip = load_tokenizer(path / "tokenizer")
        # The pipeline pads and truncates both CLIP tokenizers to the first one's length.
        tokenizers = {
            "tokenizer": PromptTokenizer(clip, name="tokenizer"),
            "tokenizer_2": PromptTokenizer(load_tokenizer(path / "tokenizer_2"), name="tokenizer_2", max_length=clip.model_max_length),
        }
        encoders: dict[str, torch.nn.Module | None] = {
            name: load_component(CLIPTextModelWithProjection, path / name, dtype, device) for name in ("text_encoder", "text_encoder_2")
        }
        encoders["text_encoder_3"] = None
        if present(path, index, "text_encoder_3"):
            tokenizers["tokenizer_3"] = PromptTokenizer(load_tokenizer(path / "tokenizer_3"), name="tokenizer_3", max_length=T5_MAX_LENGTH)
            encoders["text_encoder_3"] = load_component(T5EncoderModel, path / "text_encoder_3", dtype, device)
        cfg = transformer.config
        pooled = sum(encoders[n].config.projection_dim for n in ("text_encoder", "text_encoder_2"))
        check_width(path, "CLIP projections' summed", pooled, "pooled_projection_dim", cfg.pooled_projection_dim)
        t5 = encoders["text_encoder_3"]
        if t5 is not None:
            check_width(path, "T5", t5.config.d_model, "joint_attention_dim", cfg.joint_attention_dim)
        scheduler_config = dict(read_json(path / "scheduler" / "scheduler_config.json"))
        return cls(path, tokenizers, encoders, transformer, scheduler_config, index, device, dtype)

    def conditioning(self, outputs: dict[str, tuple[torch.Tensor, ...]], inputs: dict) -> Conditioning:
        """`encoder_hidden_states [B, 77 + 256, W]` and `pooled_projections [B, P]`, as `encode_prompt` joins them."""
        clip_dtype = self.text_encoders["text_encoder"].dtype
        (hidden_l, pooled_l), (hidden_g, pooled_g) = outputs["text_encoder"], outputs["text_encoder_2"]
        hidden_l, hidden_g = hidden_l.to(clip_dtype), hidden_g.to(clip_dtype)
        if "text_encoder_3" not in outputs:
            # The pipeline's stand-in for T5: zeros of T5's length and the transformer's text width
            # (shape[0], not len(): a scan plan's export keeps the batch axis of a size it can see).
            shape = (hidden_l.shape[0], T5_MAX_LENGTH, self.denoiser.config.joint_attention_dim)
            t5_hidden = torch.zeros(shape, device=self.device, dtype=clip_dtype)
        else:
            t5_hidden = outputs["text_encoder_3"][0].to(self.text_encoders["text_encoder_3"].dtype)
        clip_hidden = torch.cat([hidden_l, hidden_g], dim=-1)
        clip_hidden = torch.nn.functional.pad(clip_hidden, (0, t5_hidden.shape[-1] - clip_hidden.shape[-1]))
        return {
            "encoder_hidden_states": torch.cat([clip_hidden, t5_hidden], dim=-2),
            "pooled_projections": torch.cat([pooled_l, pooled_g], dim=-1),
        }

    def denoiser_module(self) -> torch.nn.Module:
        """The transformer called as the pipeline calls it."""
        return SD3Denoiser(self.denoiser)

    def schedule(self, num_inference_steps: int) -> Trajectory:
        """Flow matching Euler from the model's config, timesteps set as the pipeline sets them (`mu` when shifting dynamically)."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        scheduler = flow_scheduler(self.scheduler_config)
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", None):
            _, height, width = self.latent_shape
            patch = self.denoiser.config.patch_size
            kwargs["mu"] = calculate_shift(
                (height // patch) * (width // patch),
                scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.16),
            )
        scheduler.set_timesteps(num_inference_steps, device=self.device, **kwargs)
        return Trajectory(scheduler, flow=True)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) at the pipeline's default resolution: the transformer's sample_size."""
        cfg = self.denoiser.config
        return (cfg.in_channels, cfg.sample_size, cfg.sample_size)

    def pipeline(self, scheduler=None):
        """A `StableDiffusion3Pipeline` over the loaded components (flow matching Euler unless given)."""
        from diffusers import StableDiffusion3Pipeline

        t5_tokenizer = self.tokenizers.get("tokenizer_3")
        pipe = StableDiffusion3Pipeline(
            transformer=self.denoiser,
            scheduler=scheduler or flow_scheduler(self.scheduler_config),
            vae=self.vae(),
            text_encoder=self.text_encoders["text_encoder"],
            tokenizer=self.tokenizers["tokenizer"].tokenizer,
            text_encoder_2=self.text_encoders["text_encoder_2"],
            tokenizer_2=self.tokenizers["tokenizer_2"].tokenizer,
            text_encoder_3=self.text_encoders["text_encoder_3"],
            tokenizer_3=t5_tokenizer.tokenizer if t5_tokenizer else None,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe
