"""Scan plans: a model's first-step score compiled to one ONNX graph, so that a scan starts without torch.

The paper's detector at its defaults (the first step, shared noise) scores a prompt as
`scale * ||denoiser(x, t, c(prompt)) - u||_2`, where the latents `x`, the timestep `t`, the
unconditional prediction `u` and `scale` depend on the model and the settings alone. A plan is that
function of the token ids, exported once with the text encoders and the family's conditioning
inside (x, t, u and scale are constants of the graph), and the tokenizers beside it. A scan that
finds its plan imports ONNX Runtime and tokenizers, not torch, diffusers or transformers, and
starts in about a second (bench/RESULTS.md). Its scores are ONNX Runtime's: the settings record
names the engine `onnx`.

Plans live in `cache_dir()/plans/`, keyed by the model folder, the settings, the dtype, the size and
mtime of every file of the model's components and `model_index.json` (as the fingerprint cache,
`scanner.checkpoint`), and the versions of memscan and the libraries that build and run them: a
changed file or an upgrade keys a new plan, which the next scan builds, discarding the old one.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .cache import artefact_folder, build_artefact, cache_dir
from .checkpoint import component_files, read_json, stat_key
from .encode import PromptTokenizer, TokenizedPrompts, tokenize_with
from .errors import MemscanError, one_line
from .onnx_session import open_session
from .scores import DetectSettings, HostScores, PendingScores, PromptScores, ReadyScores, ScoreCache, cached_scores
from .threads import available_cpus

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

    from .detect import Scanner
    from .families import Family
    from .model import ScanModel

PLAN_FORMAT = 3  # bump when what a plan holds changes: older plans are then rebuilt
PLAN_FILE = "plan.json"
GRAPH_FILE = "scorer.onnx"
OUTPUT = "scores"  # the graph's one output, `[B, generations]` fp32
ENGINE = "onnx"  # the engine the settings record names: the plan's scores are ONNX Runtime's
# A new plan's scores of these, against the loaded model's, decide that it is kept (fp32 rounding apart).
CHECK_PROMPTS = ("a plan", "a photograph of a red fox in the snow, by an artist of the night")
CHECK_RTOL = 1e-4
# Latent elements (rows times generations times the latent's size) per run of the graph: 64 testbed
# prompts, where a run's activations stay in a core's cache (bench/RESULTS.md, "Scan plans").
RUN_LATENT_ELEMENTS = 2**14
# Runs side by side, one thread each, where a chunk holds this many rows or more: measured on the
# testbed (64 rows) only; a model with larger latents runs one multi-threaded run at a time.
SIDE_BY_SIDE_ROWS = 16


@dataclass(frozen=True)
class PlanRequest:
    """What a scan asks of a plan, known before any model is loaded: the model folder, the settings as given, the dtype."""

    model: Path
    settings: DetectSettings
    dtype: str = "float32"

    def lineage(self) -> dict:
        """What the plans of this request share, whatever the model's files, the libraries or the plan format are."""
        return {"model": str(self.model.resolve()), "settings": self.settings.to_dict(), "dtype": self.dtype}

    def folder(self) -> Path | None:
        """Where this request's plan is kept: keyed by the lineage, the stat key of the model's files (a changed file
        keys a new plan), the plan format and the libraries' versions (an upgrade may change what a graph computes); None when the
        folder has no readable `model_index.json` (the model's load says why)."""
        files = model_files_key(self.model)
        if files is None:
            return None
        key = {**self.lineage(), "format": PLAN_FORMAT, "files": files, "libraries": library_versions()}
        return artefact_folder(cache_dir(), "plans", self.model.name, key)


def library_versions() -> dict[str, str | None]:
    """The installed versions of what builds and runs a plan, read from their metadata (nothing imported)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("memscan", "torch", "diffusers", "transformers", "onnxruntime", "tokenizers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def model_files_key(model: Path) -> str | None:
    """The stat key (`scanner.checkpoint.stat_key`) of `model_index.json` and of every file of the components it
    names (a superset of what the family reads: the pipeline options a plan's constants depend on, such as SDXL's
    `force_zeros_for_empty_prompt`, included); None without a readable index."""
    index_file = model / "model_index.json"
    try:
        index = read_json(index_file)
    except (MemscanError, OSError):
        return None
    if not isinstance(index, dict):
        return None
    components = tuple(name for name in index if not name.startswith("_") and (model / name).is_dir())
    return stat_key(model, [index_file, *component_files(model, components)])


# Device nodes of a GPU torch may use: NVIDIA's, ROCm's, WSL's GPU passthrough.
GPU_NODES = ("nvidia[0-9]*", "kfd", "dxg")


def auto_device(dev: Path = Path("/dev")) -> str:
    """What `--device auto` is, known without torch where it can be: `cpu` on a machine with no GPU device node
    (`GPU_NODES` under `dev`); else `auto`, for torch to decide."""
    return "auto" if any(any(dev.glob(node)) for node in GPU_NODES) else "cpu"


def settings_refusal(settings: DetectSettings, device: str, dtype: str) -> str | None:
    """Why no plan can score with these settings on `device` in `dtype` (resolved names); None when one can."""
    if not settings.first_step_only:
        return "a plan scores the first step only"
    if settings.noise != "shared":
        return "a plan scores shared noise only"
    if device != "cpu":
        return "plans run on the CPU"
    if dtype != "float32":
        return "plans run in fp32"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "plans need onnxruntime: pip install onnxruntime"
    return None


def model_refusal(model: ScanModel, settings: DetectSettings) -> str | None:
    """Why no plan can score the loaded model with `settings`: the device and dtype it loaded on, its family; None when
    one can."""
    dtype = str(model.dtype).removeprefix("torch.")
    return settings_refusal(settings, model.device.type, dtype) or family_refusal(model.family)


def family_refusal(family: Family) -> str | None:
    """Why the loaded model's family cannot be planned (its prompts changed in Python, a slow tokenizer); None when it can."""
    from .families import Family

    if type(family).preprocess is not Family.preprocess:
        return f"the {family.name} family rewrites prompts before tokenizing them"
    slow = [name for name, tokenizer in family.tokenizers.items() if tokenizer._rust is None]
    if slow:
        return f"{slow[0]} is a slow (Python) tokenizer"
    return None


# -- building (torch) ----------------------------------------------------------------------------


def scorer_module(scanner: Scanner) -> torch.nn.Module:
    """`forward(**ids by tokenizer name) -> [B, n]`: the scanner's first-step scores, with its latents, timestep,
    unconditional prediction and score scale held as constants."""
    import torch

    from .families import cond_repeat

    family = scanner.family
    x, uncond = scanner._shared_state()

    class FirstStepScorer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoders = torch.nn.ModuleDict(family.text_encoder_modules())
            self.denoiser = family.denoiser_module()
            self.register_buffer("x", x)
            self.register_buffer("uncond", uncond.float())
            self.register_buffer("timestep", torch.as_tensor(scanner.timesteps[0], dtype=torch.float32))

        def forward(self, **ids: torch.Tensor) -> torch.Tensor:
            cond = family.encode_tokens(TokenizedPrompts(ids, [], []), self.encoders)
            # The batch as a traced size (`len` would be a constant of the export), the generations as a constant.
            b, n = next(iter(cond.values())).size(0), len(self.x)
            out = self.denoiser(self.x.repeat(b, 1, 1, 1), self.timestep, **cond_repeat(cond, n)).float()
            # Prompt-major rows (row i * n + g is prompt i's generation g), as `Scanner._first_step_shared`.
            return (out.view(b, n, -1) - self.uncond.view(1, n, -1)).norm(dim=2) * scanner.score_scales[0]

    return FirstStepScorer().eval()


def build_plan(model: ScanModel, request: PlanRequest) -> ScanPlan:
    """Export the loaded model's first-step score for `request`'s settings as its plan (unless another process just
    did), and read it back."""
    from .detect import Scanner

    refusal = model_refusal(model, request.settings)
    if refusal is not None:
        raise MemscanError(f"no scan plan for {request.model}: {refusal}")
    scanner = Scanner(model, request.settings)  # the eager modules: the export traces them, uncond is theirs
    family = scanner.family

    def build(folder: Path) -> None:
        tokens = family.tokenize(list(CHECK_PROMPTS))
        spec = {name: (tuple(ids.shape[1:]), "int64") for name, ids in tokens.ids.items()}
        expected = scanner.score(list(CHECK_PROMPTS), tokens=tokens).per_generation
        graph = folder / GRAPH_FILE
        # Fused attention where it exports, ONNX Runtime runs it and it agrees with the model; else torch's own ops.
        fused_refusal = _export_refusal(scanner, spec, graph, tokens, expected, fuse_attention=True)
        if fused_refusal is not None:
            unfused_refusal = _export_refusal(scanner, spec, graph, tokens, expected, fuse_attention=False)
            if unfused_refusal is not None:
                raise RuntimeError(f"its graph cannot serve scans: {unfused_refusal} (with fused attention: {fused_refusal})")
        tokenizers = {}
        for name, tokenizer in family.tokenizers.items():
            (folder / f"{name}.json").write_text(tokenizer.tokenizer.backend_tokenizer.to_str())
            hf = tokenizer.tokenizer
            tokenizers[name] = {"max_length": tokenizer.max_length, "bos_token_id": hf.bos_token_id,
                                "eos_token_id": hf.eos_token_id, "pad_token_id": hf.pad_token_id}
        manifest = {
            "format": PLAN_FORMAT,
            "lineage": request.lineage(),
            "fingerprint": scanner.model.fingerprint,
            "family": family.name,
            "settings": scanner.settings.to_dict(),  # resolved for the family, as results record them
            "latent_shape": list(scanner.model.latent_shape),
            "fused_attention": fused_refusal is None and _attention_nodes(graph) > 0,
            "unfused_because": fused_refusal,  # why the fused graph was not kept, when it was not
            "tokenizers": tokenizers,
        }
        (folder / PLAN_FILE).write_text(json.dumps(manifest, indent=2))

    folder = request.folder()
    if folder is None:
        raise MemscanError(f"{request.model}: model_index.json cannot be read")
    build_artefact(folder, PLAN_FILE, build)
    for other in folder.parent.glob(f"{folder.name.rsplit('-', 1)[0]}-*"):  # plans of older files or libraries
        if other != folder and other.is_dir() and _lineage(other) == request.lineage():
            discard(other)
    plan = ScanPlan.find(request)
    if plan is None:
        raise MemscanError(f"{request.model} changed while its scan plan was built; run the scan again")
    return plan


def _export_refusal(
    scanner: Scanner, spec: dict, graph: Path, tokens: TokenizedPrompts, expected: np.ndarray, fuse_attention: bool
) -> str | None:
    """Export the scanner's scorer to `graph`; why it cannot serve scans (it fails to export or to run, or its
    scores of `tokens` are not the model's, `expected`), else None."""
    from .engines.onnx_export import export_named

    try:
        export_named(scorer_module(scanner), spec, (OUTPUT,), graph, fuse_attention=fuse_attention)
        engine = PlanEngine(graph, threads=1, generations=scanner.settings.generations)
        try:
            got = engine.scores(tokens)
        finally:
            engine.close()
    except MemoryError:
        raise
    except Exception as exc:  # the exporter's, onnx's version converter's and ONNX Runtime's types of their own
        return f"{type(exc).__name__}: {one_line(exc)[:300]}"
    if not np.allclose(got, expected, rtol=CHECK_RTOL, atol=0):
        worst = float(np.max(np.abs(got - expected) / np.abs(expected)))
        return f"its scores differ from the model's by {worst:.2g} relative (more than {CHECK_RTOL:g})"
    return None


def _attention_nodes(graph: Path) -> int:
    """How many fused `Attention` nodes the graph at `graph` has (its weights not read)."""
    import onnx

    return sum(node.op_type == "Attention" for node in onnx.load(str(graph), load_external_data=False).graph.node)


def _lineage(folder: Path) -> dict | None:
    try:
        lineage = json.loads((folder / PLAN_FILE).read_text()).get("lineage")
        lineage.pop("format", None)  # plans before PLAN_FORMAT 3 kept it there: an older format is discarded too
        return lineage
    except (OSError, ValueError, AttributeError):
        return None


def discard(folder: Path) -> None:
    """Remove a plan folder: renamed away first (atomic), so that no scan ever finds half of one."""
    grave = folder.with_name(f"{folder.name}.discarded.{os.getpid()}")
    try:
        os.rename(folder, grave)
    except OSError:  # gone already, or replaced by another process's fresh plan
        return
    shutil.rmtree(grave, ignore_errors=True)


# -- scanning (no torch) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SavedTokenizer:
    """What `PromptTokenizer` reads of a transformers tokenizer, as a plan keeps it."""

    backend_tokenizer: Any  # tokenizers.Tokenizer
    bos_token_id: int | None
    eos_token_id: int
    pad_token_id: int


@dataclass(frozen=True)
class ScanPlan:
    """A built plan: its folder, its manifest (`plan.json`), and the model folder as this scan names it."""

    folder: Path
    manifest: dict
    model: Path

    @classmethod
    def find(cls, request: PlanRequest) -> ScanPlan | None:
        """The plan of `request` when one was built and the model's files are as they were then; else None."""
        folder = request.folder()
        if folder is None:
            return None
        try:
            manifest = json.loads((folder / PLAN_FILE).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(manifest, dict) or manifest.get("format") != PLAN_FORMAT:
            return None  # not one this memscan wrote
        return cls(folder, manifest, request.model)

    def tokenizers(self) -> dict[str, PromptTokenizer]:
        """The model's tokenizers, as its family tokenizes (primary first)."""
        from tokenizers import Tokenizer

        made = {}
        for name, saved in self.manifest["tokenizers"].items():
            backend = Tokenizer.from_file(str(self.folder / f"{name}.json"))
            tokenizer = SavedTokenizer(backend, saved["bos_token_id"], saved["eos_token_id"], saved["pad_token_id"])
            made[name] = PromptTokenizer(tokenizer, name=name, max_length=saved["max_length"])
        return made


@dataclass(frozen=True)
class PlanModel:
    """What a scan reads of its model when a plan serves it (plans run in fp32 on the CPU)."""

    fingerprint: str
    source: str
    latent_shape: tuple[int, int, int]
    dtype: str = "float32"
    device: str = "cpu"


class PlanTokenizers:
    """A plan's tokenizers, called as a family's (`tokenize`, `unconditional`)."""

    def __init__(self, tokenizers: dict[str, PromptTokenizer]):
        self.tokenizers = tokenizers

    def tokenize(self, prompts: Sequence[str]) -> TokenizedPrompts:
        """Every tokenizer's padded ids; counts and truncation from the primary one."""
        return tokenize_with(self.tokenizers, prompts)

    def unconditional(self) -> None:
        """Nothing to do: the unconditional prediction is a constant of the graph."""


class PlanEngine:
    """The plan's graph in one ONNX Runtime session on the CPU, run asynchronously on a batch's chunks of at most
    `chunk_rows` rows.

    `side_by_side`: `threads` single-threaded runs at once, for small models, whose 2-thread runs
    spend their time handing each operator's halves between cores and whose chunks' activations
    stay in a core's cache (bench/RESULTS.md, "Scan plans"); else one run at a time on `threads`
    threads, as for a large model's big operators (and its memory: one run's activations)."""

    name = ENGINE

    def __init__(
        self, path: Path, threads: int | None = None, chunk_rows: int = 64, side_by_side: bool = True, generations: int = 1
    ):
        threads = threads or available_cpus()
        self.generations = generations  # the graph's scores per row
        self.runs = threads if side_by_side else 1  # at once
        self.session = open_session(path, ["CPUExecutionProvider"], threads=1 if side_by_side else threads)
        self.chunk_rows = chunk_rows
        self._pool = ThreadPoolExecutor(self.runs, thread_name_prefix="memscan-plan")

    def submit(self, tokens: TokenizedPrompts) -> HostScores:
        """Start scoring tokenized prompts: per-generation scores `[B, n]` fp32 once `numpy()` returns."""
        rows = len(next(iter(tokens.ids.values())))
        if not rows:  # the graph's reshapes cannot run a batch of 0
            return ReadyScores(np.zeros((0, self.generations), np.float32))
        size = max(1, min(self.chunk_rows, -(-rows // self.runs)))  # every run busy on a small batch
        chunks = [{name: np.ascontiguousarray(ids[i : i + size]) for name, ids in tokens.ids.items()}
                  for i in range(0, rows, size)]
        return ChunkedScores([self._pool.submit(self._run, chunk) for chunk in chunks])

    def scores(self, tokens: TokenizedPrompts) -> np.ndarray:
        """Per-generation scores `[B, n]` fp32 of tokenized prompts."""
        return self.submit(tokens).numpy()

    def close(self) -> None:
        """Drop the runs not started (a scan stopped by Ctrl-C must not wait for the batches queued behind it);
        submitting afterwards raises."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([OUTPUT], feed)[0]


class ChunkedScores:
    """A batch's scores while its chunks run (`HostScores`): the scan writes the batch before while they do."""

    def __init__(self, runs: list[Future]):
        self._runs = runs
        self._values: np.ndarray | None = None

    def numpy(self) -> np.ndarray:
        """The scores, once every chunk's run is done."""
        if self._values is None:
            self._values = np.concatenate([run.result() for run in self._runs])
            self._runs = []
        return self._values

    def failed(self) -> bool:
        """Whether a chunk's run raised or was cancelled (runs still going have not failed yet)."""
        return any(run.cancelled() or (run.done() and run.exception() is not None) for run in self._runs)


class PlanScanner:
    """Scores prompts with a plan; what `run_scan` asks of a `Scanner` (`family.tokenize`, `submit`, `settings`,
    `model`, `engine.name`)."""

    def __init__(self, plan: ScanPlan, threads: int | None = None, cache_size: int = 65536):
        manifest = plan.manifest
        self.plan = plan
        self.settings = DetectSettings(**manifest["settings"])
        self.model = PlanModel(manifest["fingerprint"], str(plan.model), tuple(manifest["latent_shape"]))
        self.family = PlanTokenizers(plan.tokenizers())
        chunk_rows = max(1, RUN_LATENT_ELEMENTS // (self.settings.generations * int(np.prod(self.model.latent_shape))))
        self.engine = PlanEngine(plan.folder / GRAPH_FILE, threads, chunk_rows, side_by_side=chunk_rows >= SIDE_BY_SIDE_ROWS,
                                 generations=self.settings.generations)
        self._cache = ScoreCache(cache_size)

    def submit(
        self, prompts: Sequence[str], indices: Sequence[int] | None = None, tokens: TokenizedPrompts | None = None
    ) -> PendingScores:
        """Start scoring the prompts, each distinct one computed once (`indices` unused: shared noise); `result()` waits."""
        if tokens is None:
            tokens = self.family.tokenize(prompts)
        return cached_scores(self._cache, prompts, tokens, self.engine.submit)

    def score(
        self, prompts: Sequence[str], indices: Sequence[int] | None = None, tokens: TokenizedPrompts | None = None
    ) -> PromptScores:
        """`submit(...).result()`."""
        return self.submit(prompts, indices, tokens).result()

    def close(self) -> None:
        """Stop scoring: runs not started are dropped, and the scanner takes no more batches."""
        self.engine.close()
