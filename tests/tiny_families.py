"""What every tiny pipeline builder and family check shares: seeding, the tiny components, call capture, the float64 gradient.

Sizes follow diffusers' own tests (`get_dummy_components`). Tokenizers are made here, nothing is
downloaded: CLIP's from the bundled BPE vocabulary, T5's a small Unigram model built with
`tokenizers`. The family checks compare memscan against the unmodified diffusers pipeline, whose
denoiser calls a forward hook captures (`capture_calls`).
"""

from __future__ import annotations

import copy
import string
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from scanner.clip_vocab import write_clip_tokenizer

Call = tuple[tuple, dict, torch.Tensor]  # one denoiser call: positional and keyword arguments, raw output
CHARACTERS = string.ascii_letters + string.digits + string.punctuation


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """A fork of the global RNG seeded with `seed`: the same weights for a seed, the caller's stream untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models in one intra-op thread, restored after the module.

    They gain nothing from more threads, and on two shared cores thread contention made them 20x slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- components --------------------------------------------------------------------------------------
def clip_config(width: int, layers: int = 3, hidden_act: str = "gelu") -> Any:
    """A tiny `CLIPTextConfig` over CLIP's real vocabulary and 77 positions, projecting to its own width."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=37, num_hidden_layers=layers, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, hidden_act=hidden_act, projection_dim=width,
    )


def clip_tokenizer(out_dir: Path, name: str, pad_token: str) -> Any:
    """A CLIP tokenizer padding with `pad_token`, written beside `out_dir` (as `<out_dir>-<name>`) and loaded."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(write_clip_tokenizer(out_dir.with_name(f"{out_dir.name}-{name}"), pad_token=pad_token))


def t5_tokenizer(words: Iterable[str], max_length: int = 512) -> Any:
    """A T5 tokenizer (`<pad>` 0, `</s>` 1, `<unk>` 2, Metaspace `▁`) over a Unigram model of `words` and single characters.

    A word not in `words` is spelled out, one piece per character: many more tokens than words.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    # Whole words score above their spelled-out pieces, so the Viterbi split prefers them.
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -4.0)]
    pieces += [("▁" + w, -8.0) for w in sorted(set(words))]
    pieces += [(c, -6.0) for c in CHARACTERS] + [("▁" + c, -7.0) for c in CHARACTERS]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=max_length)


def tiny_t5_encoder(vocab_size: int, width: int) -> torch.nn.Module:
    """A two-layer T5 v1.1-style (gated-GELU) encoder of width `width`."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=width, d_ff=37, d_kv=8, num_heads=4, num_layers=2, relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))


def tiny_vae(latent_channels: int = 4, shift_factor: float | None = None) -> torch.nn.Module:
    """A two-block `AutoencoderKL` (scale factor 2) with `latent_channels` latent channels.

    SD3's and Flux's pipelines decode with the VAE's `shift_factor`, which theirs set.
    """
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        shift_factor=shift_factor,
    )


# -- what the pipeline does ------------------------------------------------------------------------------
class _Stop(Exception):
    """Raised from the hook once the calls a check needs are captured: the pipeline's later steps are skipped."""


def capture_calls(pipe: Any, module: torch.nn.Module, calls: int, **call: Any) -> list[Call]:
    """The first `calls` calls of `module` while `pipe(**call, output_type="latent")` runs unmodified."""
    captured: list[Call] = []

    def clone(value: Any) -> Any:
        return value.detach().clone() if torch.is_tensor(value) else value

    def hook(_module, args, kwargs, out):
        captured.append((tuple(clone(a) for a in args), {k: clone(v) for k, v in kwargs.items()}, out[0].detach()))
        if len(captured) == calls:
            raise _Stop

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        pipe(output_type="latent", **call)
    except _Stop:
        pass
    finally:
        handle.remove()
    assert len(captured) == calls, f"the pipeline called its denoiser {len(captured)} times, not {calls}"
    return captured


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`value` with `fn` applied to every tensor in it, through tuples, lists and dicts (SDXL's `added_cond_kwargs`)."""
    if torch.is_tensor(value):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(v, fn) for v in value)
    return value


def split_call(call: Call) -> tuple[Call, Call]:
    """A batched `[uncond; cond]` call as its (conditional, unconditional) halves.

    Tensors with the output's row count are split; the rest (a 0-d timestep, position ids) are shared.
    """
    rows = len(call[2])

    def half(part: slice) -> Call:
        return _map_tensors(call, lambda t: t[part] if t.dim() and len(t) == rows else t)

    return half(slice(rows // 2, None)), half(slice(None, rows // 2))


def float64_significance(module: torch.nn.Module, pairs: list[tuple[Call, Call]],
                         epsilon: Callable[[torch.Tensor], torch.Tensor] = lambda out: out,
                         key: str = "encoder_hidden_states") -> np.ndarray:
    """`[L]`: over `pairs` (a step's conditional and unconditional call), the mean `||d/de_i sum_rows ||eps(c) - eps(u)|| ||`.

    `e` is the prompt embedding (`key`) the conditional rows share, `eps` the score's part of the raw output; the
    module and the calls' arguments are taken to float64, so it is the exact gradient to rounding.
    """
    model = copy.deepcopy(module).double()

    def wide(call: Call) -> Call:
        return _map_tensors(call, lambda t: t.double() if t.is_floating_point() else t)

    total = 0.0
    for cond, uncond in pairs:
        (args, kwargs, _), (uncond_args, uncond_kwargs, _) = wide(cond), wide(uncond)
        with torch.no_grad():
            target = epsilon(model(*uncond_args, **uncond_kwargs)[0])
        sequence = kwargs[key]  # one prompt's rows, one per generation
        e = sequence[:1].clone().requires_grad_(True)
        with torch.enable_grad():
            out = epsilon(model(*args, **{**kwargs, key: e.expand_as(sequence)})[0])
            (grad,) = torch.autograd.grad((out - target).flatten(1).norm(dim=1).sum(), e)
        total = total + grad[0].norm(dim=-1)
    return (total / len(pairs)).numpy()
