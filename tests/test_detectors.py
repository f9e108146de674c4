"""Each detector against an independent float64 computation of its published formula.

The reference side loads the tiny SD 1.x pipeline with diffusers and transformers directly
(no memscan code), casts it to float64, and writes each paper's formula out explicitly; the
detector side runs memscan's fp32 scanner. Seeds are fresh each run and shown in messages.
"""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from scanner.detect import DetectSettings, Scanner
from scanner.detectors import (
    DETECTORS,
    AnisotropySettings,
    AttentionEntropySettings,
    NemoSsimSettings,
    SailSettings,
    create_detector,
)
from scanner.detectors.attention_entropy import AttentionEntropyDetector, default_layer
from scanner.detectors.ssim import ms_ssim
from scanner.errors import MemscanError
from scanner.model import load_model

PROMPTS = [
    "a photo of an astronaut riding a horse",
    "The No Limits Business Woman Podcast",
    "x",
    " ".join(["long prompt words"] * 40),  # over 77 tokens: truncated
    "Mothers influence on her young hippo",
    "¿Qué? café — naïve résumé 東京",
    "a b c d e f g",
]
# Not "": its guidance is zero up to rounding, so anisotropy's per-position cosine is the
# cosine of rounding noise (docs/detectors.md).
# Fast settings for the tiny model: two generations where the reference mean over them matters.
SMALL = {
    "wen": None,
    "anisotropy": AnisotropySettings(generations=2),
    "sail": SailSettings(generations=2),
    "attention-entropy": AttentionEntropySettings(generations=2),
    # 8 x 8 latents are too small for 3 scales at sigma 1.5: 44 is the smallest side that fits.
    "nemo-ssim": NemoSsimSettings(generations=2, latent_size=44),
}


class Float64Reference:
    """The tiny pipeline's text encoder and UNet in float64, called as diffusers' pipeline calls them."""

    def __init__(self, path: Path):
        from diffusers import DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder").double().eval()
        self.unet = UNet2DConditionModel.from_pretrained(path / "unet").double().eval()
        self.scheduler = DDIMScheduler.from_pretrained(path / "scheduler")
        self.scheduler.set_timesteps(50)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """`[B, 77, D]` last hidden states."""
        ids = self.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return self.text_encoder(ids)[0]

    def eps(self, x: torch.Tensor, t: int, e: torch.Tensor) -> torch.Tensor:
        """The UNet's epsilon for rows `x` and embeddings `e` (both `[R, ...]`)."""
        return self.unet(x, t, encoder_hidden_states=e).sample

    def latents(self, seed: int, n: int, size: int = 8) -> torch.Tensor:
        """Shared latents as memscan draws them: one CPU generator seeded with `seed`, fp32, cast."""
        return torch.randn((n, 4, size, size), generator=torch.Generator().manual_seed(seed)).double()


@pytest.fixture(scope="module")
def model(tiny_sd1):
    """The tiny SD 1.x model as memscan loads it (fp32)."""
    return load_model(tiny_sd1, device="cpu")


@pytest.fixture(scope="module")
def reference(tiny_sd1) -> Float64Reference:
    """The same weights in float64, outside memscan."""
    return Float64Reference(tiny_sd1)


def scanner_for(model, seed: int) -> Scanner:
    """A first-step scanner with shared latents from `seed`."""
    return Scanner(model, DetectSettings(seed=seed))


def fresh_seed() -> int:
    return random.randrange(2**31)


def assert_close(actual, expected, rtol: float, what: str, seed: int) -> None:
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=0, err_msg=f"{what} (seed {seed})")


def test_registry_and_unknown_name(model):
    assert set(DETECTORS) == {"wen", "anisotropy", "sail", "attention-entropy", "nemo-ssim"}
    with pytest.raises(MemscanError, match="unknown detector 'nope'"):
        create_detector("nope", scanner_for(model, 0))


def test_wen_is_the_scanner_score(model):
    seed = fresh_seed()
    settings = DetectSettings(seed=seed, generations=2)
    detector = create_detector("wen", Scanner(model, settings))
    expected = Scanner(model, settings).score(PROMPTS).score
    assert_close(detector.score(PROMPTS), expected, 0, "wen != Scanner.score", seed)
    assert detector.forwards_per_prompt() == 2


def test_anisotropy_matches_float64(model, reference):
    seed = fresh_seed()
    settings = AnisotropySettings(generations=2)
    detector = create_detector("anisotropy", scanner_for(model, seed), settings)
    n, b = settings.generations, len(PROMPTS)
    x = reference.latents(seed, n).repeat(b, 1, 1, 1)
    e_p = reference.encode(PROMPTS).repeat_interleave(n, dim=0)
    e_0 = reference.encode([""]).expand(b * n, -1, -1)
    t0, t_cos = int(reference.scheduler.timesteps[0]), int(reference.scheduler.timesteps[-3])
    assert (t0, t_cos) == (981, 41)
    with torch.no_grad():
        norm = (reference.eps(x, t0, e_p) - reference.eps(x, t0, e_0)).flatten(1).norm(dim=1)
        u = reference.eps(x, t_cos, e_0)
        d = reference.eps(x, t_cos, e_p) - u
    # torch.nn.functional.cosine_similarity over channels (dim=1), each norm clamped at 1e-8.
    cosine = (u * d).sum(1) / (u.norm(dim=1).clamp_min(1e-8) * d.norm(dim=1).clamp_min(1e-8))
    per_generation = 1.0 * norm + 2.0 * cosine.mean(dim=(1, 2))
    expected = per_generation.view(b, n).mean(dim=1).numpy()
    # The score adds terms of size ~1, so rounding is absolute: fp32 against float64. The cosine term needs more
    # where the text barely moves the prediction: d = c - u is a difference of fp32 predictions, each off by
    # ~1.5e-6 |u| (measured), so a position's cosine is off by ~1.5e-6 kappa, kappa = |u| / |d| (up to ~400 for
    # "x" at t_cos); independent over the P positions, their mean is off by ~1.5e-6 rms(kappa) / sqrt(P), times
    # gamma_2. Observed: at most 1.9e-6 of gamma_2 rms(kappa) / sqrt(P) over 40 seeds; allowed 1e-5. The fixed
    # atol alone failed 1 seed in 40 (an error of 1.1x it).
    tolerance = 2e-5 + 1e-4 * np.abs(expected) + 1e-5 * cosine_noise(u, d, 2.0, b)
    error = np.abs(detector.score(PROMPTS) - expected)
    assert (error <= tolerance).all(), f"anisotropy (seed {seed}): errors {error.tolist()}, allowed {tolerance.tolist()}"
    assert detector.forwards_per_prompt() == 4


def test_sail_matches_float64_reverse_mode_and_finite_differences(model, reference):
    seed = fresh_seed()
    n, b = 2, len(PROMPTS)
    detector = create_detector("sail", scanner_for(model, seed), SailSettings(generations=n))
    t0 = int(reference.scheduler.timesteps[0])
    sigma2 = 1 - float(reference.scheduler.alphas_cumprod[t0])
    x = reference.latents(seed, n).repeat(b, 1, 1, 1)
    e_p = reference.encode(PROMPTS).repeat_interleave(n, dim=0)
    e_0 = reference.encode([""]).expand(b * n, -1, -1)

    def guidance(z: torch.Tensor) -> torch.Tensor:
        return reference.eps(z, t0, e_p) - reference.eps(z, t0, e_0)

    with torch.no_grad():
        delta = guidance(x)
    # (J_c - J_u) delta by reverse mode only, independent of the detector's forward mode:
    # w -> <(J_c - J_u)^T w, delta> is linear in w, and its gradient is (J_c - J_u) delta.
    z = x.clone().requires_grad_(True)
    w = torch.zeros_like(x, requires_grad=True)
    with sdpa_kernel([SDPBackend.MATH]):  # the fused CPU attention kernel has no double backward
        (vjp,) = torch.autograd.grad(guidance(z), z, w, create_graph=True)
        (product,) = torch.autograd.grad((vjp * delta).sum(), w)
    expected = (product.flatten(1).norm(dim=1) / sigma2).view(b, n).mean(dim=1).detach().numpy()
    with torch.no_grad():
        h = 1e-4  # central difference of the guidance along itself, O(h^2) in float64
        finite = (guidance(x + h * delta) - guidance(x - h * delta)) / (2 * h)
    finite = (finite.flatten(1).norm(dim=1) / sigma2).view(b, n).mean(dim=1).numpy()
    assert_close(expected, finite, 1e-6, "float64 reverse mode vs finite differences", seed)
    assert_close(detector.score(PROMPTS), expected, 1e-3, "sail vs float64", seed)
    assert (detector.forwards_per_prompt(), detector.jvps_per_prompt()) == (2, 4)


def sharpened(model_or_unet) -> None:
    """Scale every cross-attention query so the tiny random model's attention is far from uniform."""
    for name, module in model_or_unet.named_modules():
        if name.endswith("attn2"):
            module.to_q.weight.data *= 40


class RecordingProcessor:
    """An explicit cross-attention (no SDPA) that records its softmax probabilities `[R, H, Lq, L]`."""

    def __init__(self):
        self.probs: torch.Tensor | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        rows, length, _ = hidden_states.shape
        heads = attn.heads
        q = attn.to_q(hidden_states).view(rows, length, heads, -1).transpose(1, 2)
        k = attn.to_k(encoder_hidden_states).view(rows, encoder_hidden_states.shape[1], heads, -1).transpose(1, 2)
        v = attn.to_v(encoder_hidden_states).view(rows, encoder_hidden_states.shape[1], heads, -1).transpose(1, 2)
        head_dim = q.shape[-1]
        self.probs = torch.softmax(q @ k.transpose(-1, -2) / head_dim**0.5, dim=-1)
        out = (self.probs @ v).transpose(1, 2).reshape(rows, length, -1)
        return attn.to_out[1](attn.to_out[0](out)) + (hidden_states if attn.residual_connection else 0)


def test_attention_entropy_matches_float64(tiny_sd1):
    seed = fresh_seed()
    model = load_model(tiny_sd1, device="cpu")
    reference = Float64Reference(tiny_sd1)
    sharpened(model.family.denoiser)
    sharpened(reference.unet)
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"  # the rule, on a one-cross-attention-down-block UNet
    detector = create_detector("attention-entropy", scanner_for(model, seed), AttentionEntropySettings(generations=2))
    assert detector.layer == layer
    n, b = 2, len(PROMPTS)
    x = reference.latents(seed, n).repeat(b, 1, 1, 1)
    e_p = reference.encode(PROMPTS).repeat_interleave(n, dim=0)
    attn = reference.unet.get_submodule(layer)
    t0 = int(reference.scheduler.timesteps[0])
    with torch.no_grad():
        default_out = reference.eps(x, t0, e_p)
        recorder = RecordingProcessor()
        attn.set_processor(recorder)
        # The explicit attention is the model's: same prediction as diffusers' own processor.
        torch.testing.assert_close(reference.eps(x, t0, e_p), default_out, rtol=1e-10, atol=1e-10)
    p = recorder.probs.mean(dim=(1, 2))  # heads, then queries: [R, 77]
    entropy = -(p * p.log()).sum(dim=1)
    expected = entropy.view(b, n).mean(dim=1).numpy()
    assert float(np.log(77) - expected.max()) > 0.05, "the sharpened attention should be far from uniform"
    assert_close(detector.score(PROMPTS), expected, 1e-5, "attention entropy", seed)


def test_attention_entropy_layer_rule():
    from diffusers import UNet2DConditionModel

    sd1_like = UNet2DConditionModel(  # SD 1.x's block layout at toy widths
        block_out_channels=(32, 32, 32, 32), layers_per_block=2, cross_attention_dim=16, attention_head_dim=8,
        norm_num_groups=8, sample_size=16,
    )
    assert default_layer(sd1_like) == "down_blocks.1.attentions.1.transformer_blocks.0.attn2"  # the reference's index 3
    two_levels = UNet2DConditionModel(  # the bundled testbed's layout
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=16, attention_head_dim=8, norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D",) * 2,
        sample_size=8,
    )
    assert default_layer(two_levels) == "down_blocks.1.attentions.0.transformer_blocks.0.attn2"


def test_attention_entropy_refuses_other_denoisers():
    scanner = SimpleNamespace(settings=DetectSettings(), family=SimpleNamespace(name="flux", denoiser=torch.nn.Linear(2, 2)))
    with pytest.raises(MemscanError, match="UNet2DConditionModel.*flux.*Linear"):
        AttentionEntropyDetector(scanner)


def numpy_ms_ssim(x: np.ndarray, y: np.ndarray, betas=(0.33, 0.33, 0.33), sigma: float = 1.5) -> np.ndarray:
    """`[N]` torchmetrics 1.3.2 MS-SSIM of a batch `[N, C, H, W]` in float64 numpy, as written in its spec."""
    from numpy.lib.stride_tricks import sliding_window_view

    radius = int(3.5 * sigma + 0.5)
    d = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-((d / sigma) ** 2) / 2)
    g /= g.sum()
    kernel = np.outer(g, g)
    values = []
    for scale in range(len(betas)):
        data_range = max(np.ptp(x), np.ptp(y))  # over the whole batch, at every scale
        c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

        def filtered(img):
            padded = np.pad(img, ((0, 0), (0, 0), (radius, radius), (radius, radius)), mode="reflect")
            windows = sliding_window_view(padded, kernel.shape, axis=(2, 3))
            return np.einsum("nchwij,ij->nchw", windows, kernel)

        mu_x, mu_y = filtered(x), filtered(y)
        s_xx = np.maximum(filtered(x * x) - mu_x**2, 0)
        s_yy = np.maximum(filtered(y * y) - mu_y**2, 0)
        s_xy = filtered(x * y) - mu_x * mu_y
        cs_map = (2 * s_xy + c2) / (s_xx + s_yy + c2)
        ssim_map = (2 * mu_x * mu_y + c1) * (2 * s_xy + c2) / ((mu_x**2 + mu_y**2 + c1) * (s_xx + s_yy + c2))
        crop = (slice(None), slice(None), slice(radius, -radius), slice(radius, -radius))
        last = scale == len(betas) - 1
        values.append(np.maximum((ssim_map if last else cs_map)[crop].reshape(len(x), -1).mean(axis=1), 0))
        n, c, h, w = x.shape  # 2 x 2 average pooling, odd edges dropped
        x = x[:, :, : h // 2 * 2, : w // 2 * 2].reshape(n, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))
        y = y[:, :, : h // 2 * 2, : w // 2 * 2].reshape(n, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))
    return np.prod([v ** beta for v, beta in zip(values, betas)], axis=0)


def test_ms_ssim_matches_float64_spec():
    seed = fresh_seed()
    generator = torch.Generator().manual_seed(seed)
    base = torch.rand((2, 1, 4, 64, 64), generator=generator, dtype=torch.float64)
    # Pairs from unrelated to nearly equal, so that every factor is exercised.
    x = base.expand(2, 5, 4, 64, 64).clone()
    y = x + torch.linspace(0.05, 2.0, 5, dtype=torch.float64)[None, :, None, None, None] * torch.rand(
        x.shape, generator=generator, dtype=torch.float64)
    y[1] = y[1] * 3  # another data range in the second group
    actual = ms_ssim(x, y).numpy()
    expected = np.stack([numpy_ms_ssim(x[g].numpy(), y[g].numpy()) for g in range(2)])
    assert_close(actual, expected, 1e-10, "ms_ssim vs float64 numpy spec", seed)
    assert expected.min() < 0.2 < 0.8 < expected.max(), expected


def test_nemo_ssim_matches_float64(model, reference):
    seed = fresh_seed()
    settings = NemoSsimSettings(generations=3, latent_size=44)
    prompts = PROMPTS[:3]
    detector = create_detector("nemo-ssim", scanner_for(model, seed), settings)
    n, size = settings.generations, settings.latent_size
    latents = reference.latents(seed, n, size)
    t1 = int(reference.scheduler.timesteps[1])
    assert t1 == 961
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    expected = []
    with torch.no_grad():
        for e_p in reference.encode(prompts):
            d = reference.eps(latents, t1, e_p[None].expand(n, -1, -1)) - latents
            low, high = d.amin(dim=(2, 3), keepdim=True), d.amax(dim=(2, 3), keepdim=True)
            maps = ((d - low) / (high - low)).numpy()
            first, second = (np.stack([maps[p[k]] for p in pairs]) for k in (0, 1))
            expected.append(numpy_ms_ssim(first, second).max())
    # The fp32 model's maps are within ~4e-7 of these; MS-SSIM in float64 keeps that to 1.1e-5 relative (worst
    # of 25 seeds). MS-SSIM in fp32 lost 1.5% at a score of 0.004: its moments cancel.
    assert_close(detector.score(prompts), expected, 1e-4, "nemo-ssim", seed)


def test_nemo_ssim_refuses_too_small_latents(model):
    with pytest.raises(MemscanError, match="needs images of at least 44 x 44; these are 8 x 8"):
        create_detector("nemo-ssim", scanner_for(model, 0))


@pytest.mark.parametrize("name", list(DETECTORS))
def test_batch_invariance(model, name):
    seed = fresh_seed()
    # No score cache: `wen` is the scanner's own score, and cached rows would be compared with themselves.
    detector = create_detector(name, Scanner(model, DetectSettings(seed=seed), cache_size=0), SMALL[name])
    batched = detector.score(PROMPTS)
    single = np.array([detector.score([p])[0] for p in PROMPTS])
    assert batched.shape == (len(PROMPTS),)
    # anisotropy's cosine term carries fp32 noise ~1.5e-6 gamma_2 rms(|u|/|d|) / sqrt(P) (see
    # test_anisotropy_matches_float64); batched and single runs round differently (seen: up to 1.0e-6 of it).
    noise = anisotropy_cosine_noise(detector, PROMPTS) if name == "anisotropy" else 0.0
    error, tolerance = np.abs(batched - single), 2e-5 + 5e-5 * np.abs(single) + 1e-5 * noise
    assert (error <= tolerance).all(), (f"{name}: batch of {len(PROMPTS)} vs batches of 1 (seed {seed}): "
                                        f"errors {error.tolist()}, allowed {tolerance.tolist()}")


def anisotropy_cosine_noise(detector, prompts) -> np.ndarray:
    """`cosine_noise` of the detector's own fp32 predictions at `t_cos`."""
    from scanner.detectors.base import in_space, prompt_rows
    from scanner.families import cond_repeat

    s, space, step = detector.settings, detector.scanner.settings.score_space, detector.cosine_step
    with torch.no_grad():
        x = prompt_rows(detector.x, len(prompts))
        u = in_space(prompt_rows(detector.unconditional(detector.trajectory, step, detector.x), len(prompts)).double(), x.double(),
                     detector.trajectory, step, space)
        c = in_space(detector.conditional(detector.trajectory, step, x, cond_repeat(detector.encode(prompts), s.generations)).double(),
                     x.double(), detector.trajectory, step, space)
    return cosine_noise(u, c - u, s.cosine_weight, len(prompts))


def cosine_noise(u: torch.Tensor, d: torch.Tensor, weight: float, prompts: int) -> np.ndarray:
    """`weight rms(|u| / |d|) / sqrt(P)` per prompt (mean over its generations) of prompt-major rows `[R, C, H, W]`:
    the scale of the anisotropy cosine term's fp32 rounding, P positions of d = c - u."""
    kappa = u.norm(dim=1) / d.norm(dim=1)
    rms = kappa.flatten(1).pow(2).mean(dim=1).sqrt() / kappa[0].numel() ** 0.5
    return (weight * rms).view(prompts, -1).mean(dim=1).numpy()
