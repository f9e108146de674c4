"""The family-specific half of a testbed build: denoiser, text encoders, training objective, pipeline.

`build.py` generates the data, trains the VAE, runs one training loop and measures the
ground truth for every family; a recipe says what that loop trains and how it is saved.

- "sd": a `UNet2DConditionModel` and one `CLIPTextModel`, epsilon prediction on Stable
  Diffusion v1's noise schedule, saved as a `StableDiffusionPipeline`.
- "sd3": an `SD3Transformer2DModel` and two `CLIPTextModelWithProjection` encoders (no T5),
  trained by rectified flow on `FlowMatchEulerDiscreteScheduler`'s shifted sigmas, saved as
  a `StableDiffusion3Pipeline`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import JointAttnProcessor2_0
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..clip_vocab import EOS_TOKEN, MODEL_MAX_LENGTH
from ..errors import MemscanError
from .groundtruth import DDIM_SAMPLER, Sampler, load_pipeline
from .world import IMAGE_SIZE

if TYPE_CHECKING:
    from .build import BuildConfig, FlowBuildConfig
    from .filtering import FilterSettings, SampleFilter

LATENT_SIZE = IMAGE_SIZE // 2

# Stable Diffusion v1's noise schedule, so that the first DDIM step of 50 is t = 981.
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}

# StableDiffusion3Pipeline's default: without text_encoder_3 it puts this many zero vectors where T5's states would be.
T5_ZERO_TOKENS = 256


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids [n, 77], padded and truncated as Stable Diffusion does."""
    return tokenizer(prompts, padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True,
                     return_tensors="pt").input_ids


def text_encoder_config(cfg: BuildConfig, tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    """A small CLIP text encoder over CLIP's full 49408-token vocabulary."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_hidden, intermediate_size=4 * cfg.text_hidden,
        num_hidden_layers=cfg.text_layers, num_attention_heads=4, max_position_embeddings=MODEL_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        projection_dim=cfg.text_hidden,
    )


def unet_config(cfg: BuildConfig) -> dict:
    """A two-level UNet2DConditionModel with cross-attention at every level."""
    levels = len(cfg.unet_channels)
    return dict(
        sample_size=LATENT_SIZE, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * levels, up_block_types=("CrossAttnUpBlock2D",) * levels,
        block_out_channels=cfg.unet_channels, layers_per_block=1, cross_attention_dim=cfg.text_hidden,
        attention_head_dim=8, norm_num_groups=min(16, cfg.unet_channels[0]),
    )


def training_scheduler() -> DDPMScheduler:
    """The noise schedule the UNet is trained with (the DDIM sampler's, as a DDPMScheduler)."""
    return DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})


class Recipe:
    """What the training loop trains for one family; subclasses build the modules in `__init__`."""

    family: str
    tokenizer_pads: dict[str, str]  # tokenizer folder -> its pad token, in the pipeline's order
    sampler: Sampler  # the family's own sampler, for the ground truth

    def modules(self) -> list[torch.nn.Module]:
        """Every trained module (text encoders first)."""
        raise NotImplementedError

    def encode(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The denoiser's conditioning for token ids [B, tokenizers, 77]."""
        raise NotImplementedError

    def training_inputs(self, x0: torch.Tensor, noise: torch.Tensor, generator: torch.Generator
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy latents, timesteps, regression target) for a batch, timesteps drawn from `generator`."""
        raise NotImplementedError

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: dict[str, torch.Tensor]) -> torch.Tensor:
        """The denoiser's output for a batch."""
        raise NotImplementedError

    def first_timestep(self) -> torch.Tensor:
        """The sampler's first timestep, where the monitor scores."""
        raise NotImplementedError

    def pipeline(self, vae, tokenizers: dict[str, CLIPTokenizer]):
        """The trained modules as the family's diffusers pipeline."""
        raise NotImplementedError

    def after_save(self, out: Path) -> None:
        """Adjust the saved folder (nothing by default)."""

    @classmethod
    def generation_pipeline(cls, folder: Path):
        """The saved pipeline as the ground truth generates with it (`sampler`'s options fit it)."""
        return load_pipeline(folder)

    def sample_filter(self, settings: FilterSettings, latents: torch.Tensor, input_ids: torch.Tensor,
                      empty_ids: torch.Tensor, num_normal: int) -> SampleFilter:
        """The training-time memorization filter (`memscan finetune`) for this recipe."""
        raise MemscanError(f"the training-time filter is implemented for the sd family only, not {self.family}")

    def train(self, mode: bool = True) -> None:
        """Every module in training (or eval) mode."""
        for module in self.modules():
            module.train(mode)

    def parameters(self) -> list[torch.nn.Parameter]:
        """Every trained parameter."""
        return [p for module in self.modules() for p in module.parameters()]


class UNetRecipe(Recipe):
    """SD 1.x: CLIPTextModel + UNet2DConditionModel, epsilon prediction, DDIM sampling."""

    family = "sd"
    tokenizer_pads = {"tokenizer": EOS_TOKEN}
    sampler = DDIM_SAMPLER

    def __init__(self, cfg: BuildConfig, tokenizer: CLIPTokenizer):
        self.text_encoder = CLIPTextModel(text_encoder_config(cfg, tokenizer))
        self.unet = UNet2DConditionModel(**unet_config(cfg))
        self.noise_scheduler = training_scheduler()

    def modules(self) -> list[torch.nn.Module]:
        """The text encoder and the UNet."""
        return [self.text_encoder, self.unet]

    def encode(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The text encoder's last hidden states."""
        return {"encoder_hidden_states": self.text_encoder(ids[:, 0])[0]}

    def training_inputs(self, x0, noise, generator):
        """Uniform timesteps over the 1000 training steps; the target is the noise."""
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
        return self.noise_scheduler.add_noise(x0, noise, t), t, noise

    def predict(self, noisy, timesteps, conditioning):
        """The UNet's epsilon."""
        return self.unet(noisy, timesteps, **conditioning).sample

    def first_timestep(self) -> torch.Tensor:
        """The first of DDIM's 50 timesteps (981)."""
        scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
        scheduler.set_timesteps(50)
        return scheduler.timesteps[0]

    def pipeline(self, vae, tokenizers):
        """A StableDiffusionPipeline without safety checker."""
        return StableDiffusionPipeline(
            vae=vae, text_encoder=self.text_encoder, tokenizer=tokenizers["tokenizer"], unet=self.unet,
            scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )

    def sample_filter(self, settings, latents, input_ids, empty_ids, num_normal):
        """The filter scores with this UNet and text encoder on the DDPM schedule."""
        from .filtering import SampleFilter

        return SampleFilter(settings, self.unet, self.text_encoder, latents, input_ids[:, 0], empty_ids[0],
                            self.noise_scheduler, num_normal)


class RepeatedContextAttnProcessor:
    """SD 3's joint attention (`JointAttnProcessor2_0`) for a context whose last token stands for `count` copies.

    Without T5 the pipeline appends 256 zero vectors to the 77 CLIP states. They enter the
    transformer as one vector (the context embedder's bias), stay identical through every
    block (the context has no positional embedding), and so act in attention as one key and
    value whose softmax weight counts `count` times: a log-count bias on its logit. Training
    on 78 context tokens instead of 333 gives the pipeline's outputs at a fifth of the cost.
    Only what the testbed's transformer uses is supported: no q/k norms, no IP adapter.
    """

    def __init__(self, count: int):
        self.log_count = math.log(count)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """(image states, context states) after one joint attention."""
        if attn.norm_q is not None or attn.norm_added_q is not None:
            raise MemscanError("the repeated-context attention supports transformers without qk_norm only")
        batch, image_tokens = hidden_states.shape[:2]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = (torch.cat([heads(image(hidden_states)), heads(context(encoder_hidden_states))], dim=2)
                             for image, context in ((attn.to_q, attn.add_q_proj), (attn.to_k, attn.add_k_proj),
                                                    (attn.to_v, attn.add_v_proj)))
        bias = query.new_zeros(key.shape[2])
        bias[-1] = self.log_count
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias.view(1, -1))
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * out.shape[-1])
        image_out, context_out = out[:, :image_tokens], out[:, image_tokens:]
        if not attn.context_pre_only:
            context_out = attn.to_add_out(context_out)
        return attn.to_out[1](attn.to_out[0](image_out)), context_out


def sd3_transformer_config(cfg: FlowBuildConfig) -> dict:
    """A small MMDiT over 8 x 8 latents: the CLIP states side by side are exactly its joint attention width."""
    return dict(
        sample_size=LATENT_SIZE, patch_size=cfg.patch_size, in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels, num_layers=cfg.transformer_layers, attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.heads, joint_attention_dim=2 * cfg.text_hidden,
        caption_projection_dim=cfg.heads * cfg.head_dim, pooled_projection_dim=2 * cfg.text_hidden,
        pos_embed_max_size=LATENT_SIZE // cfg.patch_size,
    )


class FlowRecipe(Recipe):
    """SD 3 without T5: two CLIPTextModelWithProjection + SD3Transformer2DModel, rectified flow."""

    family = "sd3"
    # The real SD 3's CLIP-L pads with its end token, CLIP-G with "!".
    tokenizer_pads = {"tokenizer": EOS_TOKEN, "tokenizer_2": "!"}
    # max_sequence_length 1: the pipeline's 256 zero T5 states as one, counted 256 times (see generation_pipeline).
    sampler = Sampler("flow matching Euler", steps=28, guidance=7.0, batch_size=64, options=(("max_sequence_length", 1),))

    def __init__(self, cfg: FlowBuildConfig, tokenizer: CLIPTokenizer):
        self.text_encoders = [CLIPTextModelWithProjection(text_encoder_config(cfg, tokenizer)) for _ in range(2)]
        self.transformer = SD3Transformer2DModel(**sd3_transformer_config(cfg))
        self.transformer.set_attn_processor(RepeatedContextAttnProcessor(T5_ZERO_TOKENS))
        self.noise_scheduler = FlowMatchEulerDiscreteScheduler(shift=cfg.flow_shift)

    def modules(self) -> list[torch.nn.Module]:
        """Both text encoders and the transformer."""
        return [*self.text_encoders, self.transformer]

    def encode(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """What `StableDiffusion3Pipeline.encode_prompt` builds, the 256 zero T5 states as one (see the processor)."""
        outputs = [encoder(ids[:, i], output_hidden_states=True) for i, encoder in enumerate(self.text_encoders)]
        hidden = torch.cat([out.hidden_states[-2] for out in outputs], dim=-1)
        zeros = hidden.new_zeros(len(hidden), 1, hidden.shape[-1])
        return {"encoder_hidden_states": torch.cat([hidden, zeros], dim=1),
                "pooled_projections": torch.cat([out[0] for out in outputs], dim=-1)}

    def training_inputs(self, x0, noise, generator):
        """Uniform over the scheduler's 1000 shifted training sigmas (diffusers' weighting "none"); target eps - x0."""
        index = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
        sigma = self.noise_scheduler.sigmas[index].view(-1, 1, 1, 1)
        return (1 - sigma) * x0 + sigma * noise, self.noise_scheduler.timesteps[index], noise - x0

    def predict(self, noisy, timesteps, conditioning):
        """The transformer's velocity."""
        return self.transformer(hidden_states=noisy, timestep=timesteps.expand(len(noisy)), **conditioning).sample

    def first_timestep(self) -> torch.Tensor:
        """Sigma 1 (timestep 1000), the first step of every flow matching Euler trajectory."""
        return self.noise_scheduler.timesteps[0]

    def pipeline(self, vae, tokenizers):
        """A StableDiffusion3Pipeline without T5, the transformer back on the standard attention."""
        self.transformer.set_attn_processor(JointAttnProcessor2_0())
        vae.register_to_config(shift_factor=0.0)  # the latents are scaled, not shifted; the pipeline needs the number
        return StableDiffusion3Pipeline(
            transformer=self.transformer, scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.noise_scheduler.config),
            vae=vae, text_encoder=self.text_encoders[0], tokenizer=tokenizers["tokenizer"],
            text_encoder_2=self.text_encoders[1], tokenizer_2=tokenizers["tokenizer_2"],
            text_encoder_3=None, tokenizer_3=None,
        )

    @classmethod
    def generation_pipeline(cls, folder: Path):
        """The saved pipeline with the repeated-context attention: its outputs are the plain pipeline's
        (256 zero T5 states) at a fifth of the cost, when called with max_sequence_length 1 (`sampler`)."""
        pipe = load_pipeline(folder)
        pipe.transformer.set_attn_processor(RepeatedContextAttnProcessor(T5_ZERO_TOKENS))
        return pipe

    def after_save(self, out: Path) -> None:
        """Drop the tokenizers' tokenizer.json: two copies (3.6 MB each) would take the bundle past its budget,
        and CLIPTokenizer rebuilds it from vocab.json and merges.txt."""
        for name in self.tokenizer_pads:
            (out / name / "tokenizer.json").unlink(missing_ok=True)


RECIPES: dict[str, type[Recipe]] = {"sd": UNetRecipe, "sd3": FlowRecipe}
