"""First-step detection throughput, side by side on the same prompts and model (`memscan bench`).

Modes, timed in turns batch by batch over the same prompts after an untimed warm-up:
  (a) a reference-style loop: one prompt at a time, conditional and unconditional in one
      batch of 2, as `StableDiffusionPipeline` runs them (written here, independently of
      `Scanner`);
  (b) the scanner, batched, eager, recomputing the unconditional prediction every batch;
  (c) the scanner as it runs by default: the cached unconditional prediction;
  (d) (c) with each other engine that can start here.
Every mode's scores are checked against (a). The orchestrator mode times reading,
tokenizing, batching and writing with the model's scoring replaced by a no-op.
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .detect import DetectSettings, Scanner
from .encode import PromptTokenizer, TokenizedPrompts
from .families.base import epsilon_scale
from .families.stable_diffusion import StableDiffusion
from .engines import ENGINES, EngineUnavailable, create_engine
from .model import ScanModel

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Stable Diffusion 1.5's component configs, as plain data: random weights of its shape.
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-5,
}
SD15_TEXT_ENCODER = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "bos_token_id": 49406,
    "eos_token_id": 49407,
}
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "epsilon",
}


@dataclass
class ModeResult:
    """One row of the table: a mode's throughput (the median over batches, and their range) and how
    far its scores are from (a)'s; the ratio is the median of batch-by-batch ratios to (a)."""

    name: str
    batch_prompts_per_s: np.ndarray = field(repr=False)  # one figure per timed batch
    scores: np.ndarray = field(repr=False)
    ratio_vs_reference: float = 1.0
    max_rel_diff: float = 0.0

    @property
    def prompts_per_s(self) -> float:
        """The median batch's prompts/s: one slow batch (another process's burst) does not move it."""
        return float(np.median(self.batch_prompts_per_s))

    @property
    def spread(self) -> float:
        """(max - min) / median of the batches' prompts/s: how steady the machine was."""
        return float(np.ptp(self.batch_prompts_per_s) / self.prompts_per_s)

    def to_dict(self) -> dict:
        """The JSON form: name, median prompts/s, its range over batches, the ratio to the reference-style loop."""
        return {
            "name": self.name,
            "prompts_per_s": self.prompts_per_s,
            "prompts_per_s_min": float(self.batch_prompts_per_s.min()),
            "prompts_per_s_max": float(self.batch_prompts_per_s.max()),
            "batches": len(self.batch_prompts_per_s),
            "ratio_vs_reference": self.ratio_vs_reference,
            "max_rel_diff_vs_reference": self.max_rel_diff,
        }


def sample_prompts(count: int, offset: int = 0) -> list[str]:
    """`count` distinct prompts: the bundled memorized captions, numbered so none repeats."""
    text = resources.files("scanner.data").joinpath("sdv1_500_memorized.jsonl").read_text(encoding="utf-8")
    captions = [json.loads(line)["caption"] for line in text.splitlines() if line.strip()]
    return [f"{captions[i % len(captions)]} #{i}" for i in range(offset, offset + count)]


def clip_tokenizer() -> PreTrainedTokenizerBase:
    """CLIP's tokenizer, built from the bundled vocabulary (no download)."""
    from transformers import AutoTokenizer

    from .clip_vocab import write_clip_tokenizer

    with tempfile.TemporaryDirectory() as folder:
        return AutoTokenizer.from_pretrained(write_clip_tokenizer(Path(folder) / "tokenizer"))


def random_unet(
    config: dict = SD15_UNET, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """A UNet with random weights built from `config` (default SD 1.5's: 860M parameters), in eval mode."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**config).to(device=device, dtype=dtype).eval().requires_grad_(False)


def sd15_model(device: str = "cpu", dtype: torch.dtype = torch.float32) -> ScanModel:
    """An SD 1.5-shaped `ScanModel` with random weights: tokenizer, text encoder, UNet."""
    from transformers import CLIPTextConfig, CLIPTextModel

    text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER)).to(device=device, dtype=dtype).eval()
    return _sd_model(text_encoder.requires_grad_(False), random_unet(SD15_UNET, dtype, device), "random-sd15",
                     "SD 1.5-shaped, random weights", torch.device(device), dtype)


def _sd_model(text_encoder, unet, fingerprint: str, source: str, device: torch.device, dtype: torch.dtype) -> ScanModel:
    """An SD 1.x `ScanModel` over modules built here (no folder), with the real CLIP tokenizer."""
    family = StableDiffusion(Path(source), {"tokenizer": PromptTokenizer(clip_tokenizer())}, {"text_encoder": text_encoder},
                             unet, dict(SD15_SCHEDULER), {}, device, dtype)
    return ScanModel(family=family, fingerprint=fingerprint, source=source, device=device, dtype=dtype)


class ReferenceLoop:
    """(a): per prompt, encode `["", prompt]`, run the UNet on `[x, x]`, take `||c - u||`."""

    def __init__(self, model: ScanModel, latent: torch.Tensor, timestep: torch.Tensor):
        self.model = model
        self.latent = latent  # [1, C, H, W], already scaled for the UNet's input
        self.timestep = timestep
        alpha_bar = float(_ddim(model).alphas_cumprod[int(timestep)])
        self.eps_scale = epsilon_scale(model.family.scheduler_config.get("prediction_type", "epsilon"), alpha_bar)

    @torch.inference_mode()
    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        """Scores of `prompts`, one pipeline-style forward each."""
        tok, scores = self.model.tokenizer, []
        text_encoder = self.model.family.text_encoders["text_encoder"]
        for prompt in prompts:
            ids = tok(["", prompt], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
            text = text_encoder(torch.as_tensor(ids.input_ids).to(self.model.device))[0]
            out = self.model.denoiser(torch.cat([self.latent, self.latent]), self.timestep, encoder_hidden_states=text).sample
            uncond, cond = out.float().chunk(2)
            scores.append(float((cond - uncond).flatten(1).norm(dim=1)[0]) * self.eps_scale)
        return np.asarray(scores)


def _ddim(model: ScanModel):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(model.family.scheduler_config)
    scheduler.set_timesteps(DetectSettings().num_inference_steps)
    return scheduler


def interleaved_throughput(
    modes: dict[str, Callable[[list[str]], np.ndarray]], prompts: list[str], warmup: list[str], batch_size: int,
    min_turn_s: float = 0.0,
) -> list[ModeResult]:
    """Each mode's prompts/s per batch over the same batches, after one untimed warm-up batch each.

    The modes take turns batch by batch, so that load from other processes (a shared
    machine) falls on all of them alike instead of on whichever ran during a busy spell.
    A mode faster than `min_turn_s` a batch scores its batch again until its turn lasts that
    long (its modes must then compute every time: no score cache), so that a scheduler tick
    does not decide a fast mode's figure.
    """
    for score in modes.values():
        score(warmup)
    rates: dict[str, list[float]] = {name: [] for name in modes}
    scores: dict[str, list[np.ndarray]] = {name: [] for name in modes}
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        for name, score in modes.items():
            start, repeats = time.perf_counter(), 0
            while True:
                out = score(batch)
                repeats += 1
                elapsed = time.perf_counter() - start
                if elapsed >= min_turn_s:
                    break
            scores[name].append(out)
            rates[name].append(repeats * len(batch) / elapsed)
    return [ModeResult(name, np.array(rates[name]), np.concatenate(scores[name])) for name in modes]


# How long each mode's turn lasts at least: (d)'s 16-prompt batches take 50 ms on the testbed, and
# timed once they moved its ratio by 25% between runs (bench/RESULTS.md).
MIN_TURN_S = 0.25


def _scanner_scores(model: ScanModel, settings: DetectSettings, **options) -> Callable[[list[str]], np.ndarray]:
    """A scanner's scoring, without its score cache: a repeated batch is computed again (`MIN_TURN_S`)."""
    scanner = Scanner(model, settings, cache_size=0, **options)
    return lambda batch: scanner.score(batch).score


def compare_modes(
    model: ScanModel,
    prompts: list[str],
    batch_size: int,
    engines: Sequence[str],
    cache_dir: Path | None = None,
    on_skip: Callable[[str, str], None] = lambda name, reason: None,
) -> list[ModeResult]:
    """Time modes (a) to (d) on the same prompts; ratios and score differences against (a)."""
    settings = DetectSettings()
    warmup = sample_prompts(batch_size, offset=len(prompts))  # distinct: Scanner caches scores by prompt
    scanner = Scanner(model, settings)
    t0 = scanner.timesteps[0]
    latent = scanner.first_step_input(scanner.shared_latents())
    modes = {
        "(a) reference loop, batch of 2": ReferenceLoop(model, latent, t0),
        "(b) scanner, batched, eager": _scanner_scores(model, settings, reuse_uncond=False),
        "(c) + cached uncond (torch)": _scanner_scores(model, settings),
    }
    for name in engines:
        try:
            engine = create_engine(name, model.family.denoiser_module(), cache_dir=cache_dir, cache_key=model.fingerprint)
        except EngineUnavailable as exc:
            on_skip(name, str(exc))
            continue
        modes[f"(d) + cached uncond ({name})"] = _scanner_scores(model, settings, engine=engine)
    results = interleaved_throughput(modes, prompts, warmup, batch_size, MIN_TURN_S)
    base = results[0]
    for result in results:
        # Batch by batch: each batch is timed beside (a)'s, so the ratio cancels the load they shared.
        result.ratio_vs_reference = float(np.median(result.batch_prompts_per_s / base.batch_prompts_per_s))
        result.max_rel_diff = float(np.max(np.abs(result.scores - base.scores) / np.abs(base.scores)))
    return results


def format_table(results: Sequence[ModeResult]) -> str:
    """The side-by-side table: median prompts/s, its spread over batches, ratio to (a), largest relative score
    difference to (a)."""
    lines = [f"{'mode':<36} {'prompts/s':>10} {'spread':>7} {'vs (a)':>8} {'max rel diff vs (a)':>20}"]
    for r in results:
        lines.append(
            f"{r.name:<36} {r.prompts_per_s:>10.2f} {r.spread:>6.0%} {r.ratio_vs_reference:>7.1f}x {r.max_rel_diff:>20.1e}"
        )
    return "\n".join(lines)


def write_json(results: Sequence[ModeResult], path: str | Path) -> None:
    """`[{"name", "prompts_per_s", "ratio_vs_reference", ...}]` to `path`."""
    Path(path).write_text(json.dumps([r.to_dict() for r in results], indent=2) + "\n")


# -- the orchestrator alone --------------------------------------------------------------------
class NoOpScanner(Scanner):
    """A scanner whose scoring returns zeros at once: what is left to time is everything around the model."""

    def _compute(self, tokens: TokenizedPrompts, latents: torch.Tensor | None = None) -> torch.Tensor:
        return torch.zeros(len(tokens.n_tokens), self.settings.generations)


@dataclass
class OrchestratorResult:
    """Prompts/s of a no-op scan, the CPU seconds it took (every thread, the reading process's included) and its
    memory: RSS after a tenth of the input, at the end, peak; the reading process's peak (its pages shared with
    the scan's, forked, counted again)."""

    prompts: int
    prompts_per_s: float
    cpu_s: float
    rss_tenth_mb: float
    rss_end_mb: float
    peak_rss_mb: float
    reader_peak_rss_mb: float

    @property
    def prompts_per_cpu_s(self) -> float:
        """Prompts per CPU second: what the scan costs, whatever share of the cores other jobs left it."""
        return self.prompts / self.cpu_s if self.cpu_s > 0 else 0.0


def _cpu_s(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def write_prompts(path: Path, count: int) -> Path:
    """`count` distinct prompts (`sample_prompts`), one a line, written 10,000 at a time."""
    with path.open("w", encoding="utf-8") as f:
        for start in range(0, count, 10000):
            f.write("".join(p + "\n" for p in sample_prompts(min(10000, count - start), offset=start)))
    return path


def orchestrator_throughput(model: ScanModel, count: int, batch_size: int, folder: Path) -> OrchestratorResult:
    """`run_scan` over a generated `count`-prompt file with `model`'s scoring a no-op: the pipeline's own ceiling."""
    from .scan import run_scan

    inputs = write_prompts(folder / "prompts.txt", count)
    scanner = NoOpScanner(model, DetectSettings())
    done, rss_tenth = 0, []

    def progress(rows: int) -> None:
        nonlocal done
        done += rows
        if not rss_tenth and done >= count // 10:
            rss_tenth.append(_rss_mb())

    cpu = _cpu_s(resource.RUSAGE_SELF) + _cpu_s(resource.RUSAGE_CHILDREN)
    summary = run_scan(scanner, [inputs], folder / "scan.parquet", batch_size=batch_size, overwrite=True, progress=progress)
    cpu = _cpu_s(resource.RUSAGE_SELF) + _cpu_s(resource.RUSAGE_CHILDREN) - cpu  # the reader is reaped by now
    # Linux reports KiB; the children's figure is the reading process's.
    peak_mb, reader_mb = (resource.getrusage(who).ru_maxrss / 1024 for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return OrchestratorResult(summary.scored, summary.prompts_per_s, cpu, rss_tenth[0] if rss_tenth else 0.0, _rss_mb(),
                              peak_mb, reader_mb)


def tokenize_throughput(tokenizer: PromptTokenizer, prompts: Sequence[str], batch_size: int) -> tuple[float, float]:
    """`tokenizer.tokenize` over `prompts` in batches of `batch_size`, after one untimed batch: (prompts/s, prompts per
    CPU second of the process, the Rust tokenizer's threads included)."""
    tokenizer.tokenize(prompts[:batch_size])
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(prompts), batch_size):
        tokenizer.tokenize(prompts[i : i + batch_size])
    return len(prompts) / (time.perf_counter() - start), len(prompts) / (time.process_time() - cpu)


def default_engines(device: torch.device, quick: bool) -> list[str]:
    """Engines for mode (d): every one but torch; `--quick` on the CPU skips compile (minutes to compile)."""
    return [name for name in ENGINES if name != "torch" and not (quick and device.type == "cpu" and name == "compile")]
