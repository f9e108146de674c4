"""`memscan generate` and `memscan mitigate`, and the generation and mitigation options they share with
`eval-mitigation` and `serve`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import MemscanError
from .common import EXIT_OK, add_format_option, add_model_options, add_trajectory_options, command_parser, load_scanner, output_folder
from .progress import show_pipeline_progress

if TYPE_CHECKING:
    from ..calibration import Calibration
    from ..detect import Scanner
    from ..mitigate import MitigationSettings

# The names of `scanner.mitigate.METHODS`, spelled out because that module imports torch;
# tests/test_cli_package.py keeps the two equal.
METHOD_NAMES = ("embed", "rand-token", "rand-number", "embed-noise")


def seed_list(text: str) -> list[int]:
    """`--seeds`: comma-separated integers, at least one."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be comma-separated integers, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("give at least one seed")
    return seeds


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    """Seeds, DDIM steps and guidance of the commands that generate images."""
    group = parser.add_argument_group("generation")
    group.add_argument("--seeds", type=seed_list, default=[0, 1, 2, 3], help="comma-separated seeds (default: 0,1,2,3)")
    add_trajectory_options(group)


def check_generation_options(args: argparse.Namespace) -> None:
    """Refuse a trajectory the generating commands cannot run."""
    if args.inference_steps < 1:
        raise MemscanError(f"--inference-steps must be >= 1, got {args.inference_steps}")


def add_mitigation_options(parser: argparse.ArgumentParser) -> None:
    """The embedding optimization's target and budget (defaults: the model folder's, else the paper's)."""
    group = parser.add_argument_group("mitigation (the embed method)")
    target = group.add_mutually_exclusive_group()
    target.add_argument("--target", type=float, help="stop once the magnitude is <= this")
    target.add_argument(
        "--calibration",
        metavar="FILE",
        help="optimize prompts scoring >= the threshold of `memscan calibrate`'s FILE down to its normal prompts' "
        "median score (default: the model folder's calibration.json, which the bundled testbed has)",
    )
    group.add_argument(
        "--lr", type=float,
        help="AdamW learning rate (default: the model folder's mitigation.json, which sets 0.1 for the bundled testbed; "
        "else 0.05, the paper's)",
    )
    group.add_argument(
        "--iterations", type=int, help="at most this many steps (default: the model folder's mitigation.json, else 10, the paper's)"
    )


def mitigation_budget(args: argparse.Namespace) -> dict:
    """`--lr`/`--iterations` where given, else the model folder's `mitigation.json`, else the paper's."""
    from ..mitigate import model_budget

    given = {"learning_rate": getattr(args, "lr", None), "max_iterations": getattr(args, "iterations", None)}
    return {**model_budget(args.model), **{key: value for key, value in given.items() if value is not None}}


@dataclass(frozen=True)
class MitigationPlan:
    """What the embed method aims for and its budget, read from the options before the model loads."""

    target: float | None
    calibration: Calibration | None
    budget: dict

    def settings(self, scanner: Scanner) -> MitigationSettings:
        """`MitigationSettings` for `scanner`: a calibration's flagged prompts (score >= threshold) go down to its
        normal median; without a target or calibration there is nothing to aim for (inf)."""
        from ..mitigate import MitigationSettings

        target, trigger = self.target, None
        if self.calibration is not None:
            trigger = self.calibration.threshold_for(scanner)
            target = trigger if self.calibration.normal_median is None else self.calibration.normal_median
        return MitigationSettings(target=float("inf") if target is None else target, trigger=trigger, **self.budget)


def mitigation_plan(args: argparse.Namespace) -> MitigationPlan:
    """The plan of `--target`, else `--calibration` (default: the model folder's), checked before the slow load."""
    from ..calibration import load_calibration

    if (args.lr is not None and not args.lr > 0) or (args.iterations is not None and args.iterations < 0):
        raise MemscanError("--lr must be > 0 and --iterations >= 0")
    calibration = args.calibration
    if args.target is None and calibration is None and (Path(args.model) / "calibration.json").is_file():
        calibration = Path(args.model) / "calibration.json"
    if args.target is None and calibration is None and "embed" in getattr(args, "methods", [getattr(args, "method", "embed")]):
        raise MemscanError(
            "the embed method needs a target: --target X, or --calibration FILE from `memscan calibrate` "
            "(the threshold for normal prompts' scores)"
        )
    uses_calibration = args.target is None and calibration is not None
    return MitigationPlan(args.target, load_calibration(calibration) if uses_calibration else None, mitigation_budget(args))


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate images for a prompt, with a JSON sidecar that records its score."""
    import json

    import torch

    from ..detect import DetectSettings
    from ..generate import build_pipeline, generate_images, labelled_grid, save_png, seed_latents

    out = output_folder(args.out, create=False)  # made once there are images: a failed run leaves no empty folder
    check_generation_options(args)
    scanner = load_scanner(args, DetectSettings())
    model = scanner.model
    pipeline = build_pipeline(model)
    show_pipeline_progress(pipeline, "generating")
    with torch.no_grad():
        cond = model.family.encode([args.prompt])
    images = generate_images(
        model.family, pipeline, cond, seed_latents(model, args.seeds), args.inference_steps, args.guidance_scale
    )
    score = float(scanner.score([args.prompt]).score[0])
    try:
        out.mkdir(parents=True, exist_ok=True)
        paths = [save_png(image, out / f"seed-{seed}.png") for seed, image in zip(args.seeds, images)]
        preview = save_png(
            labelled_grid([images], [f"score {score:.4f}"], [f"seed {seed}" for seed in args.seeds]), out / "preview.png"
        )
    except OSError as exc:
        raise MemscanError(f"{out}: cannot write images ({exc.strerror})") from exc
    sidecar = {
        "prompt": args.prompt,
        "seeds": args.seeds,
        "settings": {
            "num_inference_steps": args.inference_steps, "guidance_scale": args.guidance_scale,
            "scheduler": type(pipeline.scheduler).__name__,  # DDIM (eta 0) for diffusion families, FlowMatchEuler for flows
        },
        "model": model.fingerprint,
        "score": score,
        "score_settings": scanner.settings.to_dict(),
        "images": [p.name for p in paths],
        "preview": preview.name,
    }
    (out / "generation.json").write_text(json.dumps(sidecar, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{len(paths)} images -> {out} (score {score:.4f}; labelled and enlarged: {preview})")
    return EXIT_OK


def cmd_mitigate(args: argparse.Namespace) -> int:
    """Mitigate a prompt and write before/after generations side by side."""
    import json
    import math

    from ..detect import DetectSettings
    from ..generate import build_pipeline, image_grid, labelled_grid, save_png
    from ..mitigate import mitigate_and_generate

    out = output_folder(args.out, create=False)  # made once there are images
    check_generation_options(args)
    plan = mitigation_plan(args)
    scanner = load_scanner(args, DetectSettings(num_inference_steps=args.inference_steps))
    model = scanner.model
    settings = plan.settings(scanner)
    pipeline = build_pipeline(model)
    show_pipeline_progress(pipeline, "generating before/after")
    mitigated = mitigate_and_generate(
        scanner, pipeline, args.prompt, args.method, args.seeds, settings, args.inference_steps,
        args.guidance_scale,
    )
    result = mitigated.result
    try:
        out.mkdir(parents=True, exist_ok=True)
        labels = [f"before\nscore {result.score_before:.4f}", f"after ({args.method})\nscore {result.score_after:.4f}"]
        grid = save_png(
            labelled_grid([mitigated.before, mitigated.after], labels, [f"seed {seed}" for seed in args.seeds]),
            out / f"mitigate-{args.method}.png",
        )
        raw = save_png(image_grid([mitigated.before, mitigated.after]), out / f"mitigate-{args.method}-raw.png")
    except OSError as exc:
        raise MemscanError(f"{out}: cannot write images ({exc.strerror})") from exc
    report = {
        "prompt": args.prompt,
        "method": args.method,
        "mitigated_prompt": result.prompt,
        "score_before": result.score_before,
        "score_after": result.score_after,
        "target": None if math.isinf(settings.target) else settings.target,
        "trigger": settings.trigger,
        "learning_rate": settings.learning_rate,
        "max_iterations": settings.max_iterations,
        "iterations": result.iterations,
        "seconds": result.seconds,
        "seeds": args.seeds,
        "model": model.fingerprint,
        "images": [grid.name, raw.name],  # labelled and enlarged; the generated pixels as they are
    }
    (out / f"mitigate-{args.method}.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    if args.format == "json":
        print(json.dumps(report, ensure_ascii=False))
    else:
        print(
            f"{args.method}: score {result.score_before:.4f} -> {result.score_after:.4f} "
            f"({result.iterations} iterations, {result.seconds:.2f} s); before (top) / after (bottom): {grid}"
        )
    return EXIT_OK


def add_generation_commands(commands: argparse._SubParsersAction) -> None:
    """Register `generate` and `mitigate` on the `memscan` subparsers."""
    generate = command_parser(
        commands,
        "generate",
        cmd_generate,
        help="generate images for a prompt (CFG, the model family's own pipeline), with a JSON sidecar",
        description="Generate one image per seed, batched, with the model family's diffusers pipeline (DDIM for\n"
        "diffusion families, flow matching for SD3 and Flux); writes seed-N.png (the\n"
        "pixels as generated), preview.png (all seeds enlarged to >= 256 px, labelled) and generation.json.",
    )
    generate.add_argument("prompt", help="the prompt")
    generate.add_argument("--out", required=True, help="output folder for seed-N.png and generation.json")
    add_generation_options(generate)
    add_model_options(generate, engine_help=None)  # the pipeline runs the torch UNet

    mitigate = command_parser(
        commands,
        "mitigate",
        cmd_mitigate,
        help="mitigate a memorized prompt; before/after images side by side",
        description="Optimize the prompt embedding (the paper's method) or apply a random baseline, then generate "
        "from the same seeds before and after. Scores are first-step magnitudes on those seeds' latents.",
    )
    mitigate.add_argument("prompt", help="the prompt")
    mitigate.add_argument(
        "--out", required=True,
        help="output folder for mitigate-METHOD.png (before/after, enlarged and labelled), mitigate-METHOD-raw.png "
        "(the same pixels unscaled) and the JSON report",
    )
    mitigate.add_argument("--method", choices=METHOD_NAMES, default="embed", help="embed (the paper's; default) or a baseline")
    add_mitigation_options(mitigate)
    add_generation_options(mitigate)
    add_format_option(mitigate, "json: the report as one JSON object")
    add_model_options(mitigate, engine_help=None)  # the optimization needs autograd: torch
