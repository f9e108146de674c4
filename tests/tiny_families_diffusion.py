"""Tiny random SDXL and PixArt pipelines built from configs (no downloads), and the checks their tests share.

Sizes follow diffusers' own tests (`get_dummy_components`); tokenizers are made here: CLIP's
from the bundled BPE vocabulary, T5's a small Unigram model built with `tokenizers`. The
checks compare memscan against the unmodified diffusers pipeline, whose denoiser calls a
forward hook captures: scores (float32), explain's gradient (float64) and mitigation.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from scanner.clip_vocab import write_clip_tokenizer
from scanner.detect import DetectSettings, Scanner
from scanner.explain.gradient import token_significance
from scanner.mitigate import MitigationSettings, optimize_embedding
from scanner.model import ScanModel

STEPS = 50
LAST_STEP = 4  # the longest window the tests score ends here; pipeline runs stop after it
PROMPTS = [
    "a photo of an astronaut riding a horse",
    "The No Limits Business Woman Podcast",
    "x",
    "a photo of an astronaut riding a horse",  # duplicate: scored once, same score
    " ".join(["long prompt words"] * 50),  # 150 words: over CLIP's 77 and PixArt-α's 120 tokens
    "  Mothers influence on her young hippo ",  # PixArt strips and lowercases
    "¿Qué? café — naïve résumé 東京",
]
# The T5 tokenizer's whole-word pieces: the prompts' words and some common ones.
WORDS = sorted(set(" ".join(PROMPTS).lower().split()) | set(
    "the of and in on with at by for from to is it this that red green blue black white yellow small large old new "
    "man woman dog cat tree house city street car sky sun night day water river mountain forest beach portrait "
    "painting art style oil digital detailed high quality light dark golden hour cinematic sharp focus landscape "
    "studio realistic anime cartoon sketch drawing illustration poster cover album book film movie scene".split()
))
CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-:;()&"


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """A fork of the global RNG seeded with `seed`: the same weights for a seed, the caller's stream untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _tiny_vae() -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
    )


def build_tiny_sdxl(out_dir: Path, seed: int = 0) -> Path:
    """Save an SDXL base pipeline folder (two CLIP encoders, text-time UNet, 8x8 latents) with random weights."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    with _seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(8, 16),
            norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids and the pooled projection
            cross_attention_dim=64,  # both encoders' widths
        )
        clip = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                    max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, hidden_act="gelu", projection_dim=32)
        text_encoder = CLIPTextModel(CLIPTextConfig(**clip))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip))
        vae = _tiny_vae()
    # SDXL's two tokenizers differ only in padding: end-of-text for the first, "!" for the second.
    tokenizers = [
        CLIPTokenizer.from_pretrained(write_clip_tokenizer(out_dir.with_name(f"{out_dir.name}-{name}"), pad_token=pad))
        for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!"))
    ]
    # SDXL ships an Euler config; memscan and the tests both build DDIM from it.
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1], unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False,
    ).save_pretrained(out_dir)
    return out_dir


def t5_tokenizer(max_length: int) -> Any:
    """A T5 tokenizer (`<pad>` 0, `</s>` 1, `<unk>` 2, Metaspace `▁`) over a Unigram model of a few hundred pieces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    # Whole words score above their spelled-out pieces, so the Viterbi split prefers them.
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -4.0)]
    pieces += [("▁" + w, -8.0) for w in WORDS] + [(c, -6.0) for c in CHARACTERS] + [("▁" + c, -7.0) for c in CHARACTERS]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=max_length)


def build_tiny_pixart(out_dir: Path, variant: str = "alpha", sample_size: int = 8, patch_size: int = 2, seed: int = 0) -> Path:
    """Save a PixArt-α (`alpha`) or PixArt-Σ (`sigma`) pipeline folder: tiny T5, learned-sigma DiT, random weights.

    α at `sample_size` 128 conditions on resolution and aspect ratio; a large `patch_size` keeps it cheap.
    """
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer = t5_tokenizer(120 if variant == "alpha" else 300)
    with _seeded(seed):
        transformer = PixArtTransformer2DModel(
            sample_size=sample_size,
            num_layers=2,
            patch_size=patch_size,
            attention_head_dim=8,
            num_attention_heads=3,
            caption_channels=32,
            in_channels=4,
            cross_attention_dim=24,
            out_channels=8,  # epsilon and the learned variance
            attention_bias=True,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
        )
        text_encoder = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer), d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2,
            relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0,
        ))
        vae = _tiny_vae()
    pipeline = PixArtAlphaPipeline if variant == "alpha" else PixArtSigmaPipeline
    # PixArt ships a DPM-Solver config; memscan and the tests both build DDIM from it.
    pipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
             scheduler=DPMSolverMultistepScheduler()).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models in one intra-op thread, restored after the module.

    They gain nothing from more threads, and on two shared cores thread contention made them 20x slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_pipeline(cls: Any, path: Path, dtype: torch.dtype = torch.float32) -> Any:
    """The saved pipeline `path` as diffusers loads it, with DDIM swapped in (memscan's trajectory)."""
    from diffusers import DDIMScheduler

    pipe = cls.from_pretrained(path)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype)


class _Stop(Exception):
    """Raised from the hook once the calls a check needs are captured: the pipeline's later steps are skipped."""


def capture_calls(pipe: Any, module: torch.nn.Module, calls: int,
                  **call: Any) -> list[tuple[tuple, dict, torch.Tensor]]:
    """`(args, kwargs, raw output)` of the first `calls` calls of `module` while `pipe(**call)` runs unmodified."""
    captured = []

    def hook(_module, args, kwargs, out):
        captured.append((args, kwargs, out[0].detach()))
        if len(captured) == calls:
            raise _Stop

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        pipe(output_type="latent", num_inference_steps=STEPS, guidance_scale=7.5, **call)
    except _Stop:
        pass
    finally:
        handle.remove()
    assert len(captured) == calls, f"the pipeline called its denoiser {len(captured)} times, not {calls}"
    return captured


class PipelineNorms:
    """Per-step `||eps_c - eps_u||` (float64) of a pipeline's own denoiser calls on all `PROMPTS`, once per n.

    `epsilon` takes the epsilon part of the denoiser's raw output (PixArt: the first half of its channels).
    """

    def __init__(self, pipe: Any, module: torch.nn.Module, epsilon: Callable[[torch.Tensor], torch.Tensor],
                 latent_shape: tuple[int, int, int], seed: int, steps: int = LAST_STEP, **call: Any):
        self.pipe, self.module, self.epsilon = pipe, module, epsilon
        self.latent_shape, self.seed, self.steps, self.call = latent_shape, seed, steps, call
        self._cache: dict[int, np.ndarray] = {}

    def __call__(self, generations: int) -> np.ndarray:
        """`[steps, len(PROMPTS), generations]` norms, every prompt on the scanner's shared latents."""
        if generations not in self._cache:
            # The scanner's shared latents, drawn here independently (one CPU generator seeded with the seed),
            # for every prompt: the pipeline's rows are prompt-major.
            generator = torch.Generator().manual_seed(self.seed)
            shared = torch.randn((generations, *self.latent_shape), generator=generator)
            calls = capture_calls(self.pipe, self.module, self.steps, prompt=PROMPTS, num_images_per_prompt=generations,
                                  latents=shared.repeat(len(PROMPTS), 1, 1, 1), **self.call)
            rows = []
            for _, _, out in calls:
                uncond, cond = self.epsilon(out.double()).chunk(2)
                rows.append((cond - uncond).flatten(1).norm(dim=1).view(len(PROMPTS), generations).numpy())
            self._cache[generations] = np.stack(rows)
        return self._cache[generations]


def assert_scores_match(model: ScanModel, norms: PipelineNorms, window: tuple[int, int], generations: int) -> None:
    """Scanner scores in batches of 1 and of 7 equal the pipeline's norms averaged over the window, within 1e-4."""
    settings = DetectSettings(num_inference_steps=STEPS, start_step=window[0], end_step=window[1],
                              generations=generations, seed=norms.seed)
    expected = norms(generations)[window[0] : window[1]].mean(axis=0)
    for batch_size in (1, 7):
        scanner = Scanner(model, settings)  # fresh: no prompt cache carried between batch sizes
        got = np.concatenate([scanner.score(PROMPTS[i : i + batch_size]).per_generation
                              for i in range(0, len(PROMPTS), batch_size)])
        context = f"[prompt, generation], batch size {batch_size}, seed {norms.seed}"
        np.testing.assert_allclose(got, expected, rtol=1e-4, err_msg=context)
    # The scores tell prompts apart: one number for every prompt would pass the comparison too.
    assert expected.min() > 0 and not np.allclose(expected[0], expected[1]), f"seed {norms.seed}"


def as_float64(model: ScanModel) -> ScanModel:
    """A freshly loaded `model` with every module and the family's dtype in float64 (two gradients then agree to rounding)."""
    for module in model.family.modules():
        module.double()
    model.family.dtype = torch.float64
    return dataclasses.replace(model, dtype=torch.float64)


def pipeline_significance(pipe: Any, module: torch.nn.Module, epsilon: Callable[[torch.Tensor], torch.Tensor],
                          prompt: str, latents: torch.Tensor, window: tuple[int, int], **call: Any) -> np.ndarray:
    """`[L]`: the window's mean `||dL/de_i||`, `e` the prompt embedding of the pipeline's own calls, differentiated here."""
    n = len(latents)
    calls = capture_calls(pipe, module, window[1], prompt=prompt, num_images_per_prompt=n, latents=latents, **call)
    total = 0.0
    for args, kwargs, _ in calls[window[0] :]:
        sequence = kwargs["encoder_hidden_states"]  # [uncond rows; cond rows], each prompt row repeated n times
        e = sequence[n : n + 1].clone().requires_grad_(True)
        with torch.enable_grad():
            rows = torch.cat([sequence[:n], e.expand(n, -1, -1)])
            out = module(*args, **{**kwargs, "encoder_hidden_states": rows})[0]
            uncond, cond = epsilon(out).chunk(2)
            (grad,) = torch.autograd.grad((cond - uncond).flatten(1).norm(dim=1).sum(), e)
        total = total + grad[0].norm(dim=-1)
    return (total / (window[1] - window[0])).numpy()


def assert_gradient_matches(model64: ScanModel, pipe64: Any, module: torch.nn.Module,
                            epsilon: Callable[[torch.Tensor], torch.Tensor], window: tuple[int, int], generations: int,
                            **call: Any) -> None:
    """explain's token significance equals `pipeline_significance` on the float64 model and pipeline."""
    seed = random.randrange(2**31)
    settings = DetectSettings(num_inference_steps=STEPS, start_step=window[0], end_step=window[1],
                              generations=generations, seed=seed)
    scanner = Scanner(model64, settings)
    got = token_significance(scanner, [PROMPTS[1], "x"])
    expected = pipeline_significance(pipe64, module, epsilon, PROMPTS[1], scanner.shared_latents(), window, **call)
    np.testing.assert_allclose(got[0], expected, rtol=1e-5, atol=1e-12, err_msg=f"seed {seed}")
    assert got[0].std() > 0, f"seed {seed}"  # positions differ: a constant would pass a loose check


def assert_mitigation_lowers_score(model: ScanModel, prompt: str, iterations: int = 3) -> None:
    """`optimize_embedding` (target 0, lr 0.1) runs every iteration, lowers the score, moves only what may move."""
    seed = random.randrange(2**31)
    scanner = Scanner(model, DetectSettings(generations=2, seed=seed))
    settings = MitigationSettings(target=0.0, learning_rate=0.1, max_iterations=iterations)
    result = optimize_embedding(scanner, prompt, scanner.shared_latents(), settings)
    context = f"seed {seed}"
    assert result.score_before == pytest.approx(float(scanner.score([prompt]).score[0]), rel=1e-5), context
    assert result.iterations == iterations and result.score_after < result.score_before, context
    family = scanner.family
    encoded = family.encode([prompt])
    assert result.conditioning.keys() == encoded.keys()
    for key, value in encoded.items():
        moved, fixed = result.conditioning[key], value.shape[1]  # entries not trained stay whole
        if key in family.trainable_keys:
            fixed = family.frozen_positions if key == family.sequence_key else 0
        assert torch.equal(moved[:, :fixed], value[:, :fixed]), f"{key}: frozen positions moved, {context}"
        if fixed < value.shape[1]:
            assert not torch.allclose(moved[:, fixed:], value[:, fixed:]), f"{key} did not move, {context}"


def assert_generation_matches_prompts(model: ScanModel, **call: Any) -> None:
    """The family's pipeline fed memscan's conditioning (`generation_kwargs`) ends where it does from the prompts."""
    from scanner.families import cond_expand

    family, prompts, seed = model.family, PROMPTS[:2], random.randrange(2**31)
    latents = torch.randn((len(prompts), *model.latent_shape), generator=torch.Generator().manual_seed(seed))
    pipe = family.pipeline()
    uncond = cond_expand(family.unconditional(), len(prompts))
    kwargs = family.generation_kwargs(family.encode(prompts), uncond, latents, 7.5)
    got = pipe(**kwargs, num_inference_steps=3, output_type="latent").images
    want = pipe(prompt=prompts, latents=latents, guidance_scale=7.5, num_inference_steps=3, output_type="latent",
                **call).images
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{m}\nseed {seed}")
