"""`memscan testbed build`: train the small text-to-image model with planted memorization.

Steps: generate the data (normal world + planted pairs), train a tiny AutoencoderKL,
encode every image once, train the family's text encoders and denoiser jointly with caption
dropout (`recipes.py`: a UNet with epsilon prediction for "sd", an SD 3 transformer by
rectified flow for "sd3"), save the family's pipeline folder, write the labelled evaluation
prompts, and measure the ground truth by generation with the family's own sampler.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file
from transformers import CLIPTokenizer

from ..clip_vocab import MODEL_MAX_LENGTH, write_clip_tokenizer
from ..errors import MemscanError
from ..metrics import detection_metrics
from ..training import masked_mse_loss
from .filtering import FilterSettings
from .planted import load_memorized_captions, make_planted_images, split_by_template
from .recipes import RECIPES, Recipe, tokenize
from .world import IMAGE_SIZE, make_normal_pairs


@dataclass
class BuildConfig:
    """Sizes and training settings of one testbed build."""

    num_normal: int = 6000
    junk_fraction: float = 0.2
    num_planted: int = 100
    repeats: int = 24
    dose: tuple[int, ...] = ()  # a dose build: copies per planted caption, equal groups in this order (() = `repeats` each)
    train_steps: int = 5000
    batch_size: int = 32
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    caption_dropout: float = 0.1
    vae_steps: int = 400
    vae_channels: int = 16
    latent_channels: int = 4
    text_hidden: int = 64
    text_layers: int = 2
    unet_channels: tuple[int, ...] = (32, 64)
    eval_per_kind: int = 100
    max_held_out: int = 500
    monitor_every: int = 250
    monitor_per_kind: int = 40
    groundtruth_seeds: int = 4
    groundtruth_steps: int | None = None  # None: the family sampler's (50 DDIM steps, 28 flow steps)
    threads: int = 1
    family: str = "sd"  # the recipe (recipes.RECIPES)


@dataclass
class FlowBuildConfig(BuildConfig):
    """An SD 3 build: the same world and schedule; two CLIP encoders and an SD3Transformer2DModel."""

    family: str = "sd3"
    # Two full-vocabulary embedding tables: hidden 32 keeps both bundles under 30 MB.
    text_hidden: int = 32
    transformer_layers: int = 4
    heads: int = 4
    head_dim: int = 16
    patch_size: int = 2
    flow_shift: float = 3.0  # SD 3's
    # The autoencoder bounds reproduction: at 400 steps its round trip of a planted image has NCC 0.853 on average
    # (6% under 0.8), at 1600 steps 0.957 (bench/testbed_vae_ceiling.py, docs/testbed.md).
    vae_steps: int = 1600


_SMOKE_SIZES = dict(
    num_normal=48, num_planted=6, repeats=2, train_steps=3, batch_size=8, warmup_steps=1, vae_steps=2,
    vae_channels=8, text_hidden=16, eval_per_kind=4, max_held_out=4, monitor_every=0, monitor_per_kind=4,
    groundtruth_seeds=1,
)
SMOKE_CONFIG = BuildConfig(**_SMOKE_SIZES, text_layers=1, unet_channels=(16, 32), groundtruth_steps=10)
# Two text layers: SD 3 conditions on the penultimate hidden states, which after one layer would be the embeddings.
FLOW_SMOKE_CONFIG = FlowBuildConfig(**_SMOKE_SIZES, transformer_layers=1, heads=2, head_dim=8)
CONFIGS = {"sd": (BuildConfig, SMOKE_CONFIG), "sd3": (FlowBuildConfig, FLOW_SMOKE_CONFIG)}
# The benchmark with a dose: 20 planted captions at each count (6 at 1, 2 and 4 in the smoke build).
DOSE = dict(num_planted=120, dose=(1, 2, 4, 8, 16, 32))
SMOKE_DOSE = dict(num_planted=6, dose=(1, 2, 4))


def build_config(family: str = "sd", smoke: bool = False, dose: bool = False) -> BuildConfig:
    """The full or smoke build config of `family`, with planted captions at several copy counts if `dose`."""
    if family not in CONFIGS:
        raise MemscanError(f"unknown testbed family {family!r} (use {', '.join(CONFIGS)})")
    full, smoke_config = CONFIGS[family]
    cfg = smoke_config if smoke else full()
    return replace(cfg, **(SMOKE_DOSE if smoke else DOSE)) if dose else cfg


def planted_copies(cfg: BuildConfig) -> np.ndarray:
    """How often each planted caption appears in the training set."""
    if not cfg.dose:
        return np.full(cfg.num_planted, cfg.repeats)
    if cfg.num_planted % len(cfg.dose):
        raise MemscanError(f"{cfg.num_planted} planted captions do not split into {len(cfg.dose)} equal dose groups")
    return np.repeat(np.asarray(cfg.dose, dtype=np.int64), cfg.num_planted // len(cfg.dose))


def vae_config(cfg: BuildConfig) -> dict:
    """A two-level AutoencoderKL: 3 x 16 x 16 pixels <-> 4 x 8 x 8 latents (attention at 16 x 16 is the cost)."""
    return dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(cfg.vae_channels, 2 * cfg.vae_channels),
        layers_per_block=1, latent_channels=cfg.latent_channels, norm_num_groups=min(8, cfg.vae_channels),
        sample_size=IMAGE_SIZE, mid_block_add_attention=False,
    )


@dataclass
class TestbedData:
    """Everything the build trains and evaluates on."""

    images: np.ndarray  # [num_images, 3, 16, 16]: normal images, then planted images
    captions: list[str]  # one per image
    repeats: np.ndarray  # how often each image appears in the training set
    eval_prompts: list[dict]  # prompt, label, kind
    eval_colours: list[str | None]  # per evaluation prompt: the colour a normal caption names, else None


def make_data(cfg: BuildConfig, rng: np.random.Generator, tokenizer: CLIPTokenizer) -> TestbedData:
    """Generate the normal world, plant K captions, and assemble the labelled evaluation prompts."""
    memorized = load_memorized_captions()
    planted_half, held_out = split_by_template(memorized, rng)
    held_out = held_out[: cfg.max_held_out]
    planted_captions = [planted_half[i] for i in rng.permutation(len(planted_half))[: cfg.num_planted]]
    normal_images, normal_captions, normal_colours = make_normal_pairs(
        cfg.num_normal, rng, memorized, tokenizer, junk_fraction=cfg.junk_fraction)
    planted_images = make_planted_images(cfg.num_planted, rng)
    _, unseen_captions, unseen_colours = make_normal_pairs(cfg.eval_per_kind, rng, memorized, tokenizer)
    seen_index = rng.permutation(cfg.num_normal)[: cfg.eval_per_kind]
    seen = [normal_captions[i] for i in seen_index]
    random_strings = [random_token_string(tokenizer, rng) for _ in range(cfg.eval_per_kind)]
    copies = planted_copies(cfg)
    eval_prompts = (
        [{"prompt": p, "label": 1, "kind": "planted", **({"copies": int(n)} if cfg.dose else {})}
         for p, n in zip(planted_captions, copies)]
        + [{"prompt": p, "label": 0, "kind": "held_out_memorized_style"} for p in held_out]
        + [{"prompt": p, "label": 0, "kind": "normal_seen"} for p in seen]
        + [{"prompt": p, "label": 0, "kind": "normal_unseen"} for p in unseen_captions]
        + [{"prompt": p, "label": 0, "kind": "random_tokens"} for p in random_strings]
    )
    eval_colours = (
        [None] * (len(planted_captions) + len(held_out)) + [normal_colours[i] for i in seen_index] + unseen_colours
        + [None] * len(random_strings)
    )
    return TestbedData(
        images=np.concatenate([normal_images, planted_images]),
        captions=normal_captions + planted_captions,
        repeats=np.concatenate([np.ones(cfg.num_normal, dtype=np.int64), copies]),
        eval_prompts=eval_prompts,
        eval_colours=eval_colours,
    )


def random_token_string(tokenizer: CLIPTokenizer, rng: np.random.Generator) -> str:
    """The reference's random prompt: 0 to 76 random token ids (special tokens excluded), decoded."""
    ids = rng.integers(0, tokenizer.bos_token_id, size=int(rng.integers(0, MODEL_MAX_LENGTH)))
    return tokenizer.decode(ids.tolist())


def train_vae(cfg: BuildConfig, images: torch.Tensor, generator: torch.Generator) -> AutoencoderKL:
    """Fit the tiny autoencoder to reconstruct the training images (MSE plus a light KL term)."""
    vae = AutoencoderKL(**vae_config(cfg))
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    for _ in range(cfg.vae_steps):
        batch = images[torch.randint(len(images), (32,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        loss = F.mse_loss(vae.decode(latents).sample, batch) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return vae.eval()


@torch.no_grad()
def encode_images(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Posterior means of all images, unscaled."""
    return torch.cat([vae.encode(chunk).latent_dist.mean for chunk in images.split(256)])


def tokenize_all(tokenizers: list[CLIPTokenizer], prompts: list[str]) -> torch.Tensor:
    """Token ids [n, len(tokenizers), 77]: each prompt as every tokenizer of the recipe reads it."""
    return torch.stack([tokenize(tokenizer, prompts) for tokenizer in tokenizers], dim=1)


@torch.no_grad()
def first_step_scores(recipe: Recipe, tokenizers: list[CLIPTokenizer], prompts: list[str], x_T: torch.Tensor) -> np.ndarray:
    """Monitoring only: ||D(x_T, t_first, e_p) - D(x_T, t_first, e_empty)|| for each prompt, one shared latent."""
    conditioning = recipe.encode(tokenize_all(tokenizers, [""] + prompts))
    rows = len(prompts) + 1
    out = recipe.predict(x_T.expand(rows, -1, -1, -1), recipe.first_timestep(), conditioning)
    return (out[1:] - out[:1]).flatten(1).norm(dim=1).numpy()


def _lr_factor(step: int, cfg: BuildConfig) -> float:
    """Linear warmup, then cosine decay to 10% of the peak learning rate."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.train_steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class Denoiser:
    """The trained recipe (text encoders and denoiser), the monitoring history, and the filter's counts (None unfiltered)."""

    recipe: Recipe
    history: list[dict]
    filter_stats: dict | None


def train_denoiser(
    cfg: BuildConfig, data: TestbedData, latents: torch.Tensor, tokenizers: list[CLIPTokenizer],
    generator: torch.Generator, log: Callable[[str], None], filtering: FilterSettings | None = None,
) -> Denoiser:
    """Train the recipe's text encoders and denoiser jointly, optionally dropping high-magnitude samples from the loss."""
    recipe = RECIPES[cfg.family](cfg, tokenizers[0])
    params = recipe.parameters()
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, cfg))
    input_ids = tokenize_all(tokenizers, data.captions)
    empty_ids = tokenize_all(tokenizers, [""])[0]
    sampling_weights = torch.as_tensor(data.repeats, dtype=torch.float64)
    monitor = _monitor_set(cfg, data)
    x_T = torch.randn((1, cfg.latent_channels, *latents.shape[2:]), generator=torch.Generator().manual_seed(0))
    sample_filter = None if filtering is None else recipe.sample_filter(
        filtering, latents, input_ids, empty_ids, cfg.num_normal)
    history = []
    for step in range(cfg.train_steps):
        idx = torch.multinomial(sampling_weights, cfg.batch_size, replacement=True, generator=generator)
        ids = input_ids[idx].clone()
        # Only normal pairs lose their caption: in Stable Diffusion the duplicated images are a
        # negligible share of the data, so the unconditional prediction ignores them. Here a
        # third of the pairs are planted; dropping their captions too would tilt the
        # unconditional mean toward the planted textures and add one common offset to the
        # score of every other prompt.
        dropped = (torch.rand(len(idx), generator=generator) < cfg.caption_dropout) & (idx < cfg.num_normal)
        ids[dropped] = empty_ids
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=generator)
        noisy, t, target = recipe.training_inputs(x0, noise, generator)
        conditioning = recipe.encode(ids)
        pred = recipe.predict(noisy, t, conditioning)
        if sample_filter is None:
            loss = F.mse_loss(pred, target)
        else:
            embeddings = conditioning["encoder_hidden_states"]
            loss = masked_mse_loss(pred, target, sample_filter(step, noisy, t, embeddings, pred, idx))
        if loss is not None:  # None: every sample dropped, the step is skipped
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
        # The schedule follows the loop step, so filtered and unfiltered runs share learning rates.
        schedule.step()
        if cfg.monitor_every and ((step + 1) % cfg.monitor_every == 0 or step + 1 == cfg.train_steps):
            recipe.train(False)
            scores = first_step_scores(recipe, tokenizers, [p["prompt"] for p in monitor], x_T)
            recipe.train()
            entry = {"step": step + 1, "loss": None if loss is None else loss.item(), **_monitor_summary(monitor, scores)}
            if sample_filter is not None:
                entry["dropped"] = dict(sample_filter.dropped)
            history.append(entry)
            log(json.dumps(entry))
    recipe.train(False)
    return Denoiser(recipe, history, None if sample_filter is None else sample_filter.stats())


def _monitor_set(cfg: BuildConfig, data: TestbedData) -> list[dict]:
    """The first `monitor_per_kind` evaluation prompts of each kind."""
    counts: dict[str, int] = {}
    chosen = []
    for row in data.eval_prompts:
        counts[row["kind"]] = counts.get(row["kind"], 0) + 1
        if counts[row["kind"]] <= cfg.monitor_per_kind:
            chosen.append(row)
    return chosen


def _monitor_summary(rows: list[dict], scores: np.ndarray) -> dict:
    """AUC and mean score per kind for the monitoring subset."""
    labels = np.array([r["label"] for r in rows])
    summary = {k: round(float(v), 4) for k, v in detection_metrics(labels, scores).items() if k in ("auc", "tpr_at_1pct_fpr")}
    for kind in dict.fromkeys(r["kind"] for r in rows):
        summary["mean_" + kind] = round(float(scores[[r["kind"] == kind for r in rows]].mean()), 4)
    return summary


def save_pipeline(out: Path, recipe: Recipe, vae: AutoencoderKL, scaling_factor: float) -> None:
    """Write the recipe's pipeline folder with its weights stored in fp16 (the bundles must stay small).

    The configs keep saying float32, so a plain `from_pretrained(folder)` gives a
    consistent fp32 pipeline instead of an fp16 text encoder feeding an fp32 denoiser.
    """
    vae.register_to_config(scaling_factor=scaling_factor)
    tokenizers = {name: CLIPTokenizer.from_pretrained(out / name) for name in recipe.tokenizer_pads}
    recipe.pipeline(vae, tokenizers).save_pretrained(out, safe_serialization=True)
    recipe.after_save(out)
    for weights in out.rglob("*.safetensors"):
        tensors = load_file(weights)
        save_file({name: t.half() for name, t in tensors.items()}, weights, metadata={"format": "pt"})


@dataclass
class TrainedTestbed:
    """What `train_testbed` leaves besides the pipeline folder."""

    data: TestbedData
    denoiser: Denoiser
    train_seconds: float  # data, VAE and denoiser


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Compute on `count` torch threads inside the block, on the caller's count again after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_testbed(
    out: Path, seed: int, cfg: BuildConfig, log: Callable[[str], None], filtering: FilterSettings | None = None,
) -> TrainedTestbed:
    """Generate the data, train VAE and denoiser, save the pipeline and eval_prompts.jsonl into `out`.

    Runs on `cfg.threads` threads with the global torch RNG seeded `seed` (the modules draw their
    initial weights from it); the caller's thread count and random stream are restored afterwards.
    """
    with torch_threads(cfg.threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _train_testbed(out, seed, cfg, log, filtering)


def _train_testbed(
    out: Path, seed: int, cfg: BuildConfig, log: Callable[[str], None], filtering: FilterSettings | None,
) -> TrainedTestbed:
    """`train_testbed`'s work, with the threads and the global seed already set."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    pads = RECIPES[cfg.family].tokenizer_pads
    tokenizers = [CLIPTokenizer.from_pretrained(write_clip_tokenizer(out / name, pad_token=pad)) for name, pad in pads.items()]

    data = make_data(cfg, rng, tokenizers[0])
    log(f"data: {len(data.images)} images, {int(data.repeats.sum())} training pairs, {len(data.eval_prompts)} eval prompts")
    images = torch.from_numpy(data.images)
    vae = train_vae(cfg, images, generator)
    raw_latents = encode_images(vae, images)
    scaling_factor = float(1.0 / raw_latents.std())
    log(f"vae trained, latent std {raw_latents.std():.3f}, {time.time() - start:.0f}s")
    denoiser = train_denoiser(cfg, data, raw_latents * scaling_factor, tokenizers, generator, log, filtering)
    train_seconds = time.time() - start

    save_pipeline(out, denoiser.recipe, vae, scaling_factor)
    with open(out / "eval_prompts.jsonl", "w", encoding="utf-8") as f:
        for row in data.eval_prompts:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return TrainedTestbed(data, denoiser, train_seconds)


def build_testbed(
    out: str | Path, seed: int = 0, cfg: BuildConfig | None = None, log: Callable[[str], None] = lambda _: None,
    command: str = "",
) -> dict:
    """Build the testbed into `out`: a pipeline folder, eval_prompts.jsonl, the prompts labelled by their
    generations (groundtruth_labels.jsonl) and testbed_stats.json."""
    from .groundtruth import GROUNDTRUTH_LABELS, labelled_by_generation, measure_reproduction, reproduction_summary

    cfg = cfg or BuildConfig()
    out = Path(out)
    start = time.time()
    trained = train_testbed(out, seed, cfg, log)
    with torch_threads(cfg.threads):  # the ground truth on the build's threads too
        recipe = trained.denoiser.recipe
        sampler = recipe.sampler.with_steps(cfg.groundtruth_steps)
        sim = measure_reproduction(recipe.generation_pipeline(out), trained.data, seeds=cfg.groundtruth_seeds, sampler=sampler)
    groundtruth = reproduction_summary(sim, trained.data, sampler=sampler)
    with open(out / GROUNDTRUTH_LABELS, "w", encoding="utf-8") as f:
        for row in labelled_by_generation(sim, trained.data):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    stats = {
        "command": command,
        "seed": seed,
        "device": f"cpu ({platform.processor() or platform.machine()}), {cfg.threads} threads",
        "train_seconds": round(trained.train_seconds, 1),
        "total_seconds": round(time.time() - start, 1),
        "config": asdict(cfg),
        "num_training_pairs": int(trained.data.repeats.sum()),
        "bundle_bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
        "monitor_history": trained.denoiser.history,
        "groundtruth": groundtruth,
        "versions": {"torch": torch.__version__},
    }
    (out / "testbed_stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    return stats


def load_build_data(folder: str | Path) -> TestbedData:
    """The training and evaluation data of a built testbed, regenerated from the seed and config it records."""
    folder = Path(folder)
    try:
        stats = json.loads((folder / "testbed_stats.json").read_text(encoding="utf-8"))
        config_class = CONFIGS[stats["config"].get("family", "sd")][0]
        cfg = config_class(**{**stats["config"], "unet_channels": tuple(stats["config"]["unet_channels"]),
                              "dose": tuple(stats["config"].get("dose", ()))})
        shipped = [json.loads(line) for line in (folder / "eval_prompts.jsonl").read_text(encoding="utf-8").splitlines()]
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise MemscanError(f"{folder} is not a testbed built by `memscan testbed build` ({exc})") from exc
    data = make_data(cfg, np.random.default_rng(stats["seed"]), CLIPTokenizer.from_pretrained(folder / "tokenizer"))
    if data.eval_prompts != shipped:
        raise MemscanError(f"{folder}: this memscan version regenerates other data than the testbed was built with")
    return data
