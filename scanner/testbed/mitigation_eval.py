"""`memscan eval-mitigation`: how well each mitigation method stops the testbed's memorization, and at what cost.

For every planted prompt and a sample of normal prompts, generate with the same seeds
without mitigation and after each method, then measure
- memorization: a planted prompt is memorized when some seed's generation reaches the
  testbed's reproduction threshold (NCC >= 0.8 with its own training image, the ground
  truth's measure); also the share of single generations that do;
- fidelity on normal prompts: the share left untouched (embedding unchanged), the mean NCC
  of each mitigated generation with the unmitigated one of the same seed, and the share of
  generations that show the colour the caption names (`attributes.shows_colour`), beside
  the rate at which they show another colour (chance);
- time: seconds per prompt for the mitigation itself (generation excluded);
- the optimization's budget: iterations used on planted prompts, and the share whose
  magnitude ends at or under the target.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..detect import Scanner
from ..generate import build_pipeline, generate_images, seed_latents
from ..mitigate import MitigationSettings, mitigate
from .attributes import another_colour, shows_colour
from .build import TestbedData
from .groundtruth import REPRODUCTION_THRESHOLD
from .similarity import normalized_cross_correlation

NORMAL_KINDS = ("normal_seen", "normal_unseen")
CHANCE_SEED = 1_000_003  # draws each normal prompt's "another colour" (the chance baseline)


@dataclass
class Case:
    """One evaluation prompt: its kind, its own training image (planted only), named and chance colour (normal only)."""

    prompt: str
    kind: str
    image_index: int | None
    colour: str | None
    other_colour: str | None


def select_cases(data: TestbedData, normal_per_kind: int) -> list[Case]:
    """Every planted prompt, then the first `normal_per_kind` prompts of each normal kind."""
    caption_index = {caption: i for i, caption in enumerate(data.captions)}
    rng = np.random.default_rng(CHANCE_SEED)
    cases, counts = [], dict.fromkeys(NORMAL_KINDS, 0)
    for row, colour in zip(data.eval_prompts, data.eval_colours):
        kind = row["kind"]
        if kind == "planted":
            cases.append(Case(row["prompt"], kind, caption_index[row["prompt"]], None, None))
        elif kind in counts and counts[kind] < normal_per_kind:
            counts[kind] += 1
            cases.append(Case(row["prompt"], kind, None, colour, None if colour is None else another_colour(colour, rng)))
    return cases


def _pixels(images: np.ndarray) -> np.ndarray:
    """uint8 `[S, H, W, 3]` -> float `[S, 3, H, W]` in [-1, 1], the training images' layout."""
    return images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1


def evaluate_mitigation(
    scanner: Scanner,
    data: TestbedData,
    methods: Sequence[str],
    settings: MitigationSettings,
    seeds: Sequence[int] = (0, 1, 2, 3),
    normal_per_kind: int = 50,
    guidance: float = 7.5,
    progress: Callable[[int], None] = lambda _: None,
) -> dict:
    """The table of `methods` (plus "none") on the testbed: memorization, fidelity, time.

    Generations take as many DDIM steps as the scanner's `num_inference_steps`, whose first
    timestep is the one the embedding is optimized at."""
    steps = scanner.settings.num_inference_steps
    pipeline = build_pipeline(scanner.model)
    latents = seed_latents(scanner.model, list(seeds))
    cases = select_cases(data, normal_per_kind)
    records: dict[str, list[dict]] = {name: [] for name in ("none", *methods)}
    for case in cases:
        with torch.no_grad():
            original = scanner.family.encode([case.prompt])
        before = _pixels(generate_images(scanner.family, pipeline, original, latents, steps, guidance))
        records["none"].append(_measure(case, data, before, before, untouched=True))
        for method in methods:
            result = mitigate(scanner, case.prompt, method, latents, settings, seed=seeds[0])
            after = _pixels(generate_images(scanner.family, pipeline, result.conditioning, latents, steps, guidance))
            untouched = result.prompt == case.prompt and all(torch.equal(result.conditioning[k], original[k]) for k in original)
            reached = result.score_after <= settings.target
            records[method].append(_measure(case, data, before, after, untouched, result.seconds, result.iterations, reached))
        progress(1)
    rows = [_summarize(name, entries) for name, entries in records.items()]
    normal = [r for r in records["none"] if r["colour"] is not None]
    return {
        "mitigation": {**asdict(settings), "target": settings.target if math.isfinite(settings.target) else None},
        "seeds": list(seeds),
        "sampler": f"DDIM, {steps} steps, guidance {guidance}",
        "reproduction": f"NCC >= {REPRODUCTION_THRESHOLD} with its own training image (per-channel centred)",
        "n_planted": sum(c.kind == "planted" for c in cases),
        "n_normal": sum(c.kind != "planted" for c in cases),
        "n_normal_with_colour": len(normal),
        "chance_attribute_rate": float(np.mean([r["other_colour_rate"] for r in normal])) if normal else None,
        "methods": rows,
    }


def _measure(
    case: Case, data: TestbedData, before: np.ndarray, after: np.ndarray, untouched: bool,
    seconds: float = 0.0, iterations: int = 0, reached_target: bool | None = None,
) -> dict:
    """One prompt's figures for one method (the defaults: no mitigation)."""
    record: dict = {
        "kind": case.kind, "colour": case.colour, "seconds": seconds, "untouched": untouched,
        "iterations": iterations, "reached_target": reached_target,
    }
    if case.image_index is not None:
        own = normalized_cross_correlation(after, data.images[case.image_index : case.image_index + 1])[:, 0]
        record["reproduced"] = own >= REPRODUCTION_THRESHOLD
    else:
        record["fidelity_ncc"] = float(np.diag(normalized_cross_correlation(after, before)).mean())
        if case.colour is not None:
            record["colour_rate"] = float(shows_colour(after, case.colour).mean())
            record["other_colour_rate"] = float(shows_colour(after, case.other_colour).mean())
    return record


def _summarize(method: str, entries: list[dict]) -> dict:
    """Means over prompts of one method's records."""
    planted = [e for e in entries if e["kind"] == "planted"]
    normal = [e for e in entries if e["kind"] != "planted"]
    coloured = [e for e in normal if e["colour"] is not None]

    def mean(values: list) -> float | None:
        return float(np.mean(values)) if values else None

    return {
        "method": method,
        "planted_memorized": mean([bool(e["reproduced"].any()) for e in planted]),
        "planted_memorized_generations": mean([float(e["reproduced"].mean()) for e in planted]),
        "normal_untouched": mean([e["untouched"] for e in normal]),
        "normal_fidelity_ncc": mean([e["fidelity_ncc"] for e in normal]),
        "normal_attribute_rate": mean([e["colour_rate"] for e in coloured]),
        "seconds_per_prompt": mean([e["seconds"] for e in entries]),
        "planted_seconds_per_prompt": mean([e["seconds"] for e in planted]),
        "planted_iterations": mean([e["iterations"] for e in planted]),
        "planted_reached_target": mean([e["reached_target"] for e in planted if e["reached_target"] is not None]),
    }


def markdown_table(report: dict) -> str:
    """The README's table for a report of `evaluate_mitigation`."""
    def cell(value: float | None, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    lines = [
        "| method | planted memorized (any of "
        f"{len(report['seeds'])} seeds) | planted generations memorized | normal untouched | "
        "normal fidelity (NCC to unmitigated) | normal named colour shown | s / prompt | "
        "planted: iterations, share at target |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["methods"]:
        lines.append(
            f"| {row['method']} | {cell(row['planted_memorized'], '.1%')} | {cell(row['planted_memorized_generations'], '.1%')} "
            f"| {cell(row['normal_untouched'], '.1%')} | {cell(row['normal_fidelity_ncc'], '.3f')} "
            f"| {cell(row['normal_attribute_rate'], '.1%')} | {cell(row['seconds_per_prompt'], '.3f')} "
            f"| {cell(row['planted_iterations'], '.1f')}, {cell(row['planted_reached_target'], '.0%')} |"
        )
    return "\n".join(lines)
