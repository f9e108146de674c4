"""Tiny random flow-matching pipelines (SD 3, Flux) built from configs, and the checks both families share.

Sizes follow diffusers' own `get_dummy_components` (tests/pipelines/stable_diffusion_3,
tests/pipelines/flux). Tokenizers are made here: CLIP from the bundled BPE vocabulary, T5 as a
small Unigram model with T5's special tokens; nothing is downloaded. The checks compare
memscan against the family's unmodified diffusers pipeline, whose transformer calls a forward
hook records.
"""

from __future__ import annotations

import copy
import string
from pathlib import Path

import numpy as np
import pytest
import torch

from scanner.clip_vocab import write_clip_tokenizer
from scanner.detect import DetectSettings, Scanner
from scanner.explain.gradient import token_significance
from scanner.mitigate import MitigationSettings, optimize_embedding
from scanner.model import ScanModel

PROMPTS = [
    "a photo of an astronaut riding a horse on the moon",
    "Living in the light with Ann Graham Lotz",
    "z",
    "a photo of an astronaut riding a horse on the moon",  # duplicate: scored once, same score
    " ".join(["many repeated words"] * 40),  # past 77 CLIP tokens and past the T5 length: truncated
    "an oil painting of a lighthouse at dusk, 4k",
    "¿Qué? café — naïve résumé 東京",
]


def write_t5_tokenizer(out_dir: Path) -> Path:
    """A T5-style tokenizer (Unigram over characters and a few words, `▁` Metaspace, `</s>` appended), saved."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    # T5's special ids: <pad> 0, </s> 1, <unk> 2.
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("▁" + w, -3.0) for w in "a an the of on in with photo painting".split()]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(
        tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0, model_max_length=512
    )
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _t5_encoder(vocab_size: int, width: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size, d_model=width, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0,
    )
    return T5EncoderModel(config)


def _clip_config(width: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, hidden_act="gelu", projection_dim=width,
    )


def _tokenizers(out_dir: Path, clip_pads: tuple[str, ...]) -> tuple[list, object]:
    """CLIP tokenizers (one per pad token) and the T5 tokenizer, written beside `out_dir`."""
    from transformers import AutoTokenizer, CLIPTokenizer

    clips = [
        CLIPTokenizer.from_pretrained(write_clip_tokenizer(out_dir.with_name(f"{out_dir.name}-clip{i}"), pad_token=pad))
        for i, pad in enumerate(clip_pads)
    ]
    t5 = AutoTokenizer.from_pretrained(write_t5_tokenizer(out_dir.with_name(f"{out_dir.name}-t5")))
    return clips, t5


def _vae(latent_channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    )


def build_tiny_sd3(out_dir: Path, with_t5: bool = True, seed: int = 0) -> Path:
    """Save a `StableDiffusion3Pipeline` folder (CLIP widths 16 + 24 padded to T5's 48); `with_t5=False` leaves text_encoder_3 out."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    # The real SD3's CLIP-L pads with its end token, CLIP-G with "!".
    (clip_l, clip_g), t5_tokenizer = _tokenizers(out_dir, ("<|endoftext|>", "!"))
    with torch.random.fork_rng(devices=[]):  # the same weights for a seed; the caller's stream untouched
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
            caption_projection_dim=32, joint_attention_dim=48, pooled_projection_dim=40, out_channels=4,
        )
        text_encoder = CLIPTextModelWithProjection(_clip_config(16))
        text_encoder_2 = CLIPTextModelWithProjection(_clip_config(24))
        text_encoder_3 = _t5_encoder(len(t5_tokenizer), 48) if with_t5 else None
        vae = _vae(4)
    # Without T5, the scheduler shifts by resolution (mu), so both of the pipeline's timestep paths are covered.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0) if with_t5 else FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae,
        text_encoder=text_encoder, tokenizer=clip_l, text_encoder_2=text_encoder_2, tokenizer_2=clip_g,
        text_encoder_3=text_encoder_3, tokenizer_3=t5_tokenizer if with_t5 else None,
    )
    pipe.save_pretrained(out_dir)
    return out_dir


def build_tiny_flux(out_dir: Path, seed: int = 0) -> Path:
    """Save a guidance-distilled `FluxPipeline` folder (1 latent channel, packed to 4) with Flux.1-dev's scheduler config."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    (clip,), t5_tokenizer = _tokenizers(out_dir, ("<|endoftext|>",))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Narrower attention than diffusers' dummy (one head of 8): the default 1024 px image is 4096 packed tokens.
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=1,
            joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[2, 2, 4], guidance_embeds=True,
        )
        text_encoder = CLIPTextModel(_clip_config(32))
        text_encoder_2 = _t5_encoder(len(t5_tokenizer), 32)
        vae = _vae(1)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    pipe = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=clip,
        text_encoder_2=text_encoder_2, tokenizer_2=t5_tokenizer, transformer=transformer,
    )
    pipe.save_pretrained(out_dir)
    return out_dir


# -- what the pipeline does ------------------------------------------------------------------------
Call = tuple[dict, torch.Tensor]  # one transformer call: its keyword arguments and its output (float64)


def transformer_calls(pipe, last_step: int, **call) -> list[Call]:
    """Every transformer call of an unmodified pipeline run, stopped after `last_step` steps."""
    calls: list[Call] = []

    def record(module, args, kwargs, out):
        inputs = {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}
        calls.append((inputs, out[0].detach().double()))

    def stop_after_window(pipeline, step, timestep, callback_kwargs):
        if step + 1 >= last_step:
            pipeline._interrupt = True  # diffusers' own early exit: later steps are skipped
        return callback_kwargs

    hook = pipe.transformer.register_forward_hook(record, with_kwargs=True)
    try:
        with torch.random.fork_rng(devices=[]):
            pipe(**call, output_type="latent", callback_on_step_end=stop_after_window)
    finally:
        hook.remove()
    return calls


def float64_significance(transformer: torch.nn.Module, cond: dict, uncond: dict, key: str = "encoder_hidden_states") -> np.ndarray:
    """`|| d/de_i sum_rows ||f(cond) - f(uncond)|| ||` per position `[rows, L]`, in float64, from the pipeline's own call arguments."""
    model = copy.deepcopy(transformer).double()

    def wide(kwargs: dict) -> dict:
        return {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}

    cond, uncond = wide(cond), wide(uncond)
    with torch.no_grad():
        target = model(**uncond)[0]
    e = cond[key].clone().requires_grad_(True)
    loss = (model(**{**cond, key: e})[0] - target).flatten(1).norm(dim=1).sum()
    (grad,) = torch.autograd.grad(loss, e)
    return grad.norm(dim=-1).numpy()


class TinyPipeline:
    """A saved tiny model loaded twice, by memscan and as the family's diffusers pipeline; the pipeline's norms, cached.

    Subclasses say how the pipeline takes latents and how its transformer calls pair into (cond, uncond) per step.
    """

    steps = 28  # both pipelines' default num_inference_steps
    last_step = 3  # the longest window ends here; the pipeline is stopped after it

    def __init__(self, model: ScanModel, pipe, seed: int, guidance: float, context: str):
        self.model, self.pipe, self.seed, self.guidance = model, pipe, seed, guidance
        self.context = f"{context}, seed {seed}, guidance {guidance:.3f}"
        self._norms: dict = {}

    def latent_shape(self) -> tuple[int, int, int]:
        """One latent's shape at the pipeline's default resolution, read from the pipeline."""
        raise NotImplementedError

    def pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents `[R, C, H, W]` as the pipeline's `latents=` takes them."""
        return latents

    def extra_call(self, prompts: list[str]) -> dict:
        """Arguments the pipeline call for `prompts` needs besides them, the latents and the step count."""
        return {"guidance_scale": self.guidance}

    def step_outputs(self, calls: list[Call]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each step's (conditional, unconditional) transformer output."""
        raise NotImplementedError

    def latents(self, n: int) -> torch.Tensor:
        """The scanner's shared latents: `n` drawn from a CPU generator seeded `seed`."""
        return torch.randn((n, *self.latent_shape()), generator=torch.Generator().manual_seed(self.seed))

    def calls(self, n: int, prompts: list[str], last_step: int) -> list[Call]:
        """The pipeline's transformer calls for `prompts`, `n` images each, every prompt from the same latents."""
        latents = self.pipeline_latents(self.latents(n).repeat(len(prompts), 1, 1, 1))
        return transformer_calls(
            self.pipe, last_step, prompt=prompts, num_images_per_prompt=n, latents=latents, num_inference_steps=self.steps,
            **self.extra_call(prompts),
        )

    def norms(self, n: int, prompts: list[str]) -> np.ndarray:
        """`[last_step, prompts * n]`: `||v_cond - v_uncond||` at each step (float64)."""
        key = n, tuple(prompts)
        if key not in self._norms:
            pairs = self.step_outputs(self.calls(n, prompts, self.last_step))
            self._norms[key] = np.stack([(c - u).flatten(1).norm(dim=1).numpy() for c, u in pairs])
        return self._norms[key]

    def settings(self, window: tuple[int, int], generations: int) -> DetectSettings:
        """Scanner settings matching the pipeline runs."""
        return DetectSettings(
            num_inference_steps=self.steps, start_step=window[0], end_step=window[1], generations=generations,
            seed=self.seed, guidance_scale=self.guidance,
        )


# -- the shared checks ---------------------------------------------------------------------------------
def check_parity(tiny: TinyPipeline, window: tuple[int, int], generations: int, batch_size: int, prompts: list[str]) -> None:
    """The scanner's per-generation scores, batch by batch, equal the window's mean of the pipeline's norms (1e-4 relative)."""
    context = f"window {window}, n {generations}, batch {batch_size}, {tiny.context}"
    scanner = Scanner(tiny.model, tiny.settings(window, generations))
    got = np.concatenate([scanner.score(prompts[i : i + batch_size]).per_generation for i in range(0, len(prompts), batch_size)])
    expected = tiny.norms(generations, prompts)[window[0] : window[1]].mean(axis=0).reshape(len(prompts), generations)
    np.testing.assert_allclose(got, expected, rtol=1e-4, err_msg=context)
    assert np.all(expected > 0), context  # the comparison is not between zeros


def check_epsilon_space(tiny: TinyPipeline, prompts: list[str]) -> None:
    """Epsilon-space scores over a 3-step window are the pipeline's velocity norms times (1 - sigma); at the first step alone, exactly 0."""
    norms = tiny.norms(1, prompts)  # runs the pipeline, which sets its scheduler's sigmas
    scales = 1.0 - tiny.pipe.scheduler.sigmas.double().numpy()[: tiny.last_step, None]
    epsilon = DetectSettings(**{**tiny.settings((0, tiny.last_step), 1).to_dict(), "score_space": "epsilon"})
    got = Scanner(tiny.model, epsilon).score(prompts).per_generation
    expected = (norms * scales).mean(axis=0)[:, None]
    np.testing.assert_allclose(got, expected, rtol=1e-4, err_msg=tiny.context)
    assert np.all(expected > 0), tiny.context
    first = DetectSettings(**{**epsilon.to_dict(), "end_step": 1})
    assert np.all(Scanner(tiny.model, first).score(prompts).per_generation == 0.0), tiny.context


def check_significance(tiny: TinyPipeline, reference: np.ndarray, prompt: str) -> None:
    """Explain's first-step gradient significance equals a float64 autograd computation `reference [1, L]`."""
    context = f"{prompt!r}, {tiny.context}"
    got = token_significance(Scanner(tiny.model, tiny.settings((0, 1), 1)), [prompt])
    assert got.shape == reference.shape, context
    np.testing.assert_allclose(got, reference, rtol=1e-3, atol=1e-6 * reference.max(), err_msg=context)
    assert reference.max() > 0, context


def check_mitigation(tiny: TinyPipeline, prompt: str) -> None:
    """Embedding optimization (target 0, lr 0.1, 3 steps) lowers the scanner's score; frozen positions stay bit-identical, the rest moves."""
    context = f"{prompt!r}, {tiny.context}"
    scanner = Scanner(tiny.model, tiny.settings((0, 1), 1))
    family = scanner.family
    before = scanner.score([prompt]).score[0]
    with torch.no_grad():
        encoded = family.encode([prompt])
    result = optimize_embedding(
        scanner, prompt, scanner.shared_latents(), MitigationSettings(target=0.0, learning_rate=0.1, max_iterations=3)
    )
    assert result.score_before == pytest.approx(before, rel=1e-4), context
    assert result.iterations == 3 and result.score_after < result.score_before, context
    for key in family.trainable_keys:
        frozen = family.frozen_positions if key == family.sequence_key else 0
        moved, original = result.conditioning[key], encoded[key]
        assert torch.equal(moved[:, :frozen], original[:, :frozen]), f"{key}: a frozen position moved, {context}"
        assert not torch.equal(moved[:, frozen:], original[:, frozen:]), f"{key} did not move, {context}"
