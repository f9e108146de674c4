"""`memscan`: the command-line face. Only the `cli*` modules parse arguments, print and exit.

Exit codes: 0 success; 1 internal error (a bug: please report it); 2 a usage or input
problem (bad option, missing file, bad model path, unwritable output), reported in one line;
3 prompts were flagged and `--fail-on-flagged` was given; 130 interrupted (re-run the same
command to resume).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .engines import ENGINES, EngineUnavailable
from .errors import MemscanError

if TYPE_CHECKING:
    from .calibration import Calibration
    from .detect import Scanner
    from .mitigate import MitigationSettings

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_FLAGGED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES_HELP = """exit codes:
  0    success
  1    internal error (a bug; please report it with the traceback)
  2    usage or input error (bad option, missing file, bad model, unwritable output)
  3    prompts flagged and --fail-on-flagged given
  130  interrupted (re-run the same command to resume)"""


def output_file(path: str, suffixes: Sequence[str] = ()) -> Path:
    """`path` as a file to write at the end of long work, checked now: its folder is made, a folder is refused."""
    target = Path(path)
    if suffixes and target.suffix.lower() not in suffixes:
        raise MemscanError(f"{target}: the file name must end in one of {', '.join(suffixes)}")
    if target.is_dir():
        raise MemscanError(f"{target} is a folder, not a file")
    with writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
    return target


def output_folder(path: str, create: bool = True) -> Path:
    """`path` as an output folder, checked now: a file there is refused; made unless `create` is False."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise MemscanError(f"{out} exists and is not a folder")
    if create:
        with writing(out):
            out.mkdir(parents=True, exist_ok=True)
    return out


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn a failure to write `path` into a one-line `MemscanError`."""
    try:
        yield
    except OSError as exc:
        raise MemscanError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _quiet_libraries() -> None:
    """Silence load-time chatter of diffusers/transformers; memscan reports what matters."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for logging in (diffusers_logging, transformers_logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _default_model() -> str:
    from .testbed import default_model_path

    return str(default_model_path())


ENGINE_HELP = f"UNet backend: {', '.join(ENGINES)} (default: torch)"


def _add_model_options(parser: argparse.ArgumentParser, engine_help: str | None = ENGINE_HELP) -> None:
    """--model, --device, --dtype and (unless `engine_help` is None: commands that need autograd) --engine."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model", default=_default_model(), help="diffusers pipeline folder, or a hub id in the local HF cache (default: the bundled testbed)"
    )
    group.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N (default: auto)")
    group.add_argument("--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16")
    if engine_help is not None:
        group.add_argument("--engine", default="torch", help=engine_help)


def _add_detect_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("detection")
    group.add_argument("--steps", type=int, default=1, help="score sampling steps [0, N) (default: 1, the first step)")
    group.add_argument("--inference-steps", type=int, default=50, help="DDIM inference steps (default: 50)")
    group.add_argument("--generations", type=int, default=1, help="initial latents per prompt (default: 1)")
    group.add_argument("--guidance-scale", type=float, default=7.5, help="CFG scale for steps after the first (default: 7.5)")
    group.add_argument("--seed", type=int, default=0, help="seed of the initial latents (default: 0)")
    group.add_argument(
        "--noise",
        choices=("shared", "reference"),
        default="shared",
        help="shared: the same latents for every prompt (default); reference: seed = row index + seed, as the paper's code",
    )
    group.add_argument("--batch-size", type=int, default=16, help="prompts per UNet batch (default: 16)")


def _detect_settings(args: argparse.Namespace):
    from .detect import DetectSettings

    if args.batch_size < 1:
        raise MemscanError(f"--batch-size must be >= 1, got {args.batch_size}")
    return DetectSettings(
        num_inference_steps=args.inference_steps,
        end_step=args.steps,
        generations=args.generations,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        noise=args.noise,
    )


def _scanner(args: argparse.Namespace):
    from .detect import ScannerSpec

    spec = ScannerSpec(args.model, _detect_settings(args), args.device, args.dtype, args.engine)  # errors before the slow load
    _quiet_libraries()
    return spec.load()


def _scanner_and_threshold(args: argparse.Namespace):
    """The scanner and the flagging threshold: `--threshold`, or `--calibration`'s checked against the scanner."""
    from .calibration import load_calibration

    calibration = load_calibration(args.calibration) if args.calibration else None  # before the slow model load
    scanner = _scanner(args)
    return scanner, args.threshold if calibration is None else calibration.threshold_for(scanner)


def cmd_scan(args: argparse.Namespace) -> int:
    """Score prompt files into a Parquet/JSONL output."""
    from tqdm import tqdm

    from .cli_ray import check_ray_options, scan_on_ray
    from .io import check_inputs
    from .scan import run_scan

    check_inputs(args.inputs, args.field)  # input errors before the slow model load
    if args.checkpoint_rows < 1:
        raise MemscanError(f"--checkpoint-rows must be >= 1, got {args.checkpoint_rows}")
    if check_ray_options(args):  # the workers load the model; a calibration is checked against their settings
        from .calibration import load_calibration

        scanner, calibration = None, load_calibration(args.calibration) if args.calibration else None
        threshold = calibration.threshold if calibration else args.threshold
    else:
        scanner, threshold = _scanner_and_threshold(args)
    with tqdm(desc="scanning", unit=" prompts", disable=None, dynamic_ncols=True) as bar:
        options = dict(
            field=args.field, batch_size=args.batch_size, overwrite=args.overwrite, progress=bar.update,
            commit_rows=args.checkpoint_rows,
        )
        if scanner is None:
            summary = scan_on_ray(args, threshold=args.threshold, calibration=calibration, **options)
        else:
            summary = run_scan(scanner, args.inputs, args.out, threshold=threshold, **options)
    flagged = "n/a (no --threshold)" if threshold is None else str(summary.flagged)
    resumed = f" ({summary.resumed} rows resumed)" if summary.resumed else ""
    print(
        f"scored {summary.scored}{resumed}, flagged {flagged}, rejected {summary.rejected}, "
        f"{summary.prompts_per_s:.1f} prompts/s -> {summary.out} (rejects: {summary.rejects})"
    )
    return EXIT_FLAGGED if args.fail_on_flagged and summary.flagged else EXIT_OK


def _explain_inputs(args: argparse.Namespace) -> list[str]:
    """The prompts from the command line, then those of `--input` (bad rows reported, skipped)."""
    from .io import check_inputs, read_prompts

    prompts = list(args.prompts)
    if args.input:
        for row in read_prompts(check_inputs([args.input], args.field), args.field):
            if row.error is None:
                prompts.append(row.prompt)
            else:
                print(f"memscan: skipped {row.id}: {row.error}", file=sys.stderr)
    if not prompts:
        raise MemscanError("no prompts: give PROMPT arguments or --input FILE")
    return prompts


def cmd_explain(args: argparse.Namespace) -> int:
    """Print each prompt's score and its words coloured by significance (or JSON lines)."""
    import json

    from .explain import explain
    from .terminal import highlight, top_words, verdict

    prompts = _explain_inputs(args)  # input errors before the slow model load
    scanner, threshold = _scanner_and_threshold(args)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    for start in range(0, len(prompts), args.batch_size):
        for explanation in explain(scanner, prompts[start : start + args.batch_size], args.method):
            if args.json:
                print(json.dumps(explanation.to_dict(threshold), ensure_ascii=False), flush=True)
                continue
            print(verdict(explanation, threshold) + ("  (prompt truncated)" if explanation.truncated else ""))
            print("  " + highlight(explanation, color))
            print(f"  most significant ({args.method}): {top_words(explanation)}", flush=True)
    return EXIT_OK


def _serve_mitigation(args: argparse.Namespace, scanner: Scanner, threshold: float | None) -> MitigationSettings | None:
    """What `POST /v1/mitigate` aims for: as `memscan mitigate` with the service's calibration, else its threshold."""
    from .calibration import load_calibration
    from .mitigate import MitigationSettings

    if threshold is None:
        return None
    target, trigger = _calibrated_targets(load_calibration(args.calibration), scanner) if args.calibration else (threshold, None)
    return MitigationSettings(target=target, trigger=trigger, **_mitigation_budget(args))


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the score/explain API and the prompt page until interrupted."""
    try:
        import uvicorn

        from .service import create_app
    except ImportError as exc:
        raise MemscanError(f"memscan serve needs the serve extra: pip install 'memscan[serve]' ({exc.name} missing)") from exc

    if not 0 <= args.port <= 65535:
        raise MemscanError(f"--port must be in 0..65535, got {args.port}")
    scanner, threshold = _scanner_and_threshold(args)
    app = create_app(scanner, threshold=threshold, mitigation=_serve_mitigation(args, scanner, threshold), batch_size=args.batch_size)
    print(f"memscan: serving {scanner.model.source} on http://{args.host}:{args.port}/", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return EXIT_OK


def _add_command(
    commands, name: str, handler, help: str, description: str, engine_help: str = ENGINE_HELP
) -> argparse.ArgumentParser:
    """A model-loading subcommand: its handler, the model and detection options, exit codes in --help."""
    command = commands.add_parser(
        name, help=help, description=description, epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_model_options(command, engine_help)
    _add_detect_options(command)
    command.set_defaults(handler=handler)
    return command


def _add_threshold_options(parser: argparse.ArgumentParser, flagged: str) -> None:
    """`--threshold` or `--calibration` (not both): where the flagging threshold comes from."""
    group = parser.add_argument_group("flagging").add_mutually_exclusive_group()
    group.add_argument("--threshold", type=float, help=f"flag prompts whose score is >= this{flagged}")
    group.add_argument(
        "--calibration",
        metavar="FILE",
        help="take the threshold from `memscan calibrate`'s FILE (refused for another model or other settings)",
    )


def _bench_model(args: argparse.Namespace):
    from .model import load_model, resolve_device, resolve_dtype

    _quiet_libraries()
    if args.sd15:
        from .benchmark import sd15_model

        device = resolve_device(args.device)
        return sd15_model(str(device), resolve_dtype(args.dtype, device))
    return load_model(args.model, device=args.device, dtype=args.dtype)


def cmd_bench(args: argparse.Namespace) -> int:
    """Time first-step detection side by side (modes a-d), or the orchestrator with no-op models."""
    import json
    import tempfile

    from . import benchmark

    if args.batch_size < 1 or (args.prompts is not None and args.prompts < 1):
        raise MemscanError("--batch-size and --prompts must be >= 1")
    json_out = output_file(args.json) if args.json else None  # before the timing, not after it
    if args.orchestrator:
        count = args.prompts or (100_000 if args.quick else 1_000_000)
        with tempfile.TemporaryDirectory() as folder:
            result = benchmark.orchestrator_throughput(count, args.batch_size, Path(folder))
        print(
            f"orchestrator, no-op model: {result.prompts} prompts, batch {args.batch_size}: {result.prompts_per_s:,.0f} prompts/s; "
            f"RSS {result.rss_tenth_mb:.0f} MB at 10%, {result.rss_end_mb:.0f} MB at the end, peak {result.peak_rss_mb:.0f} MB"
        )
        if json_out:
            with writing(json_out):
                json_out.write_text(json.dumps([{"name": "orchestrator (no-op model)", **vars(result)}], indent=2) + "\n")
        return EXIT_OK
    model = _bench_model(args)
    count = args.prompts or (2 if args.sd15 else 16) * (1 if args.quick else 4)
    if args.engines is None:
        engines = benchmark.default_engines(model.device, args.quick)
    else:  # --engines "" times modes (a) to (c) only
        engines = [name for name in args.engines.split(",") if name]
    from .cache import cache_dir

    results = benchmark.compare_modes(
        model,
        benchmark.sample_prompts(count),
        args.batch_size,
        engines,
        cache_dir=cache_dir(),
        on_skip=lambda name, reason: print(f"engine {name} skipped: {reason}", file=sys.stderr),
    )
    print(f"{model.source}: {count} prompts, batch {args.batch_size}, {model.device}, {model.dtype}, {torch_threads()} threads")
    print(benchmark.format_table(results))
    if json_out:
        with writing(json_out):
            benchmark.write_json(results, json_out)
    return EXIT_OK


def torch_threads() -> int:
    """Threads torch computes with (what a CPU figure depends on)."""
    import torch

    return torch.get_num_threads()


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be comma-separated integers, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("give at least one seed")
    return seeds


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    """Seeds, DDIM steps and guidance of the commands that generate images."""
    parser.add_argument("--seeds", type=_seed_list, default=[0, 1, 2, 3], help="comma-separated seeds (default: 0,1,2,3)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM inference steps (default: 50)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default: 7.5)")


def _generation_folder(args: argparse.Namespace) -> Path:
    """Check `--out` (a folder, created later) and `--steps` of the generating commands."""
    out = output_folder(args.out, create=False)
    if args.steps < 1:
        raise MemscanError(f"--steps must be >= 1, got {args.steps}")
    return out


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate images for a prompt, with a JSON sidecar that records its score."""
    import json

    import torch

    from .detect import DetectSettings, Scanner
    from .generate import build_pipeline, generate_images, save_png, seed_latents
    from .model import load_model

    out = _generation_folder(args)
    _quiet_libraries()
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    pipeline = build_pipeline(model)
    scanner = Scanner(model, DetectSettings())
    with torch.no_grad():
        cond = model.family.encode([args.prompt])
    images = generate_images(model.family, pipeline, cond, seed_latents(model, args.seeds), args.steps, args.guidance)
    try:
        out.mkdir(parents=True, exist_ok=True)
        paths = [save_png(image, out / f"seed-{seed}.png") for seed, image in zip(args.seeds, images)]
    except OSError as exc:
        raise MemscanError(f"{out}: cannot write images ({exc.strerror})") from exc
    score = float(scanner.score([args.prompt]).score[0])
    sidecar = {
        "prompt": args.prompt,
        "seeds": args.seeds,
        "settings": {"num_inference_steps": args.steps, "guidance_scale": args.guidance, "scheduler": "DDIM", "eta": 0.0},
        "model": model.fingerprint,
        "score": score,
        "score_settings": scanner.settings.to_dict(),
        "images": [p.name for p in paths],
    }
    (out / "generation.json").write_text(json.dumps(sidecar, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{len(paths)} images -> {out} (score {score:.4f})")
    return EXIT_OK


def _add_mitigation_options(parser: argparse.ArgumentParser) -> None:
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


def _check_mitigation_options(args: argparse.Namespace) -> None:
    if (args.lr is not None and not args.lr > 0) or (args.iterations is not None and args.iterations < 0):
        raise MemscanError("--lr must be > 0 and --iterations >= 0")


def _calibrated_targets(calibration: Calibration, scanner: Scanner) -> tuple[float, float]:
    """(target, trigger) from a calibration: flagged prompts (score >= threshold) go down to the normal median."""
    trigger = calibration.threshold_for(scanner)
    return (trigger if calibration.normal_median is None else calibration.normal_median), trigger


def _mitigation_budget(args: argparse.Namespace) -> dict:
    """`--lr`/`--iterations` where given, else the model folder's `mitigation.json`, else the paper's."""
    from .mitigate import model_budget

    given = {"learning_rate": getattr(args, "lr", None), "max_iterations": getattr(args, "iterations", None)}
    return {**model_budget(args.model), **{key: value for key, value in given.items() if value is not None}}


def mitigation_settings(args: argparse.Namespace, scanner: Scanner) -> MitigationSettings:
    """`MitigationSettings` from the options: the target is `--target`, else a calibration's threshold."""
    from .calibration import load_calibration
    from .mitigate import MitigationSettings

    target, trigger, calibration = args.target, None, args.calibration
    if target is None and calibration is None and (Path(args.model) / "calibration.json").is_file():
        calibration = Path(args.model) / "calibration.json"
    if target is None and calibration is not None:
        target, trigger = _calibrated_targets(load_calibration(calibration), scanner)
    if target is None and "embed" in getattr(args, "methods", [getattr(args, "method", "embed")]):
        raise MemscanError(
            "the embed method needs a target: --target X, or --calibration FILE from `memscan calibrate` "
            "(the threshold for normal prompts' scores)"
        )
    return MitigationSettings(target=float("inf") if target is None else target, trigger=trigger, **_mitigation_budget(args))


def cmd_mitigate(args: argparse.Namespace) -> int:
    """Mitigate a prompt and write before/after generations side by side."""
    import json
    import math

    from .detect import DetectSettings, Scanner
    from .generate import build_pipeline, image_grid, save_png
    from .mitigate import mitigate_and_generate
    from .model import load_model

    out = _generation_folder(args)
    _check_mitigation_options(args)
    _quiet_libraries()
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    scanner = Scanner(model, DetectSettings(num_inference_steps=args.steps))
    settings = mitigation_settings(args, scanner)
    mitigated = mitigate_and_generate(
        scanner, build_pipeline(model), args.prompt, args.method, args.seeds, settings, args.steps, args.guidance
    )
    result = mitigated.result
    try:
        out.mkdir(parents=True, exist_ok=True)
        grid = save_png(image_grid([mitigated.before, mitigated.after]), out / f"mitigate-{args.method}.png")
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
        "images": [grid.name],
    }
    (out / f"mitigate-{args.method}.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        print(
            f"{args.method}: score {result.score_before:.4f} -> {result.score_after:.4f} "
            f"({result.iterations} iterations, {result.seconds:.2f} s); before (top) / after (bottom): {grid}"
        )
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The `memscan` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="memscan",
        description="Find prompts a text-to-image diffusion model has memorized (Wen et al., ICLR 2024).",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"memscan {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    scan = _add_command(
        commands,
        "scan",
        cmd_scan,
        help="score prompt files for memorization",
        description="Score every prompt of the inputs; resumable: re-run the same command after a crash.",
        engine_help=f"{ENGINE_HELP}; or ray: score on a Ray cluster, each worker running --worker-engine",
    )
    scan.add_argument("inputs", nargs="+", metavar="INPUT", help=".txt (a prompt a line), .jsonl, .csv or .parquet; or a quoted glob")
    scan.add_argument("--out", required=True, help="output file, .parquet or .jsonl (rejects go to STEM.rejects.jsonl beside it)")
    scan.add_argument("--field", help="jsonl/csv/parquet field holding the prompt (default: prompt, caption or text)")
    _add_threshold_options(scan, "")
    scan.add_argument("--fail-on-flagged", action="store_true", help="exit with code 3 when any prompt is flagged")
    scan.add_argument("--overwrite", action="store_true", help="replace an existing output or another run's partial output")
    scan.add_argument(
        "--checkpoint-rows", type=int, default=2048, help="commit results at least every N rows (and every 30 s)"
    )
    from .cli_ray import add_ray_options

    add_ray_options(scan)

    bench = commands.add_parser(
        "bench",
        help="measure first-step throughput: reference-style loop vs scanner vs engines",
        description="Prompts/s of first-step detection, side by side on the same prompts and model, as ratios "
        "to a reference-style loop; or, with --orchestrator, of reading/tokenizing/writing alone.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("--model", default=_default_model(), help="diffusers pipeline folder (default: the bundled testbed)")
    bench.add_argument("--sd15", action="store_true", help="an SD 1.5-shaped model with random weights instead")
    bench.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    bench.add_argument("--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16")
    bench.add_argument("--engines", help=f"comma-separated engines for mode (d) (default: all of {', '.join(ENGINES)} but torch)")
    bench.add_argument(
        "--prompts", type=int,
        help="prompts to time (default: 64, 16 with --quick; 8, 2 with --sd15; 1,000,000, 100,000 with --orchestrator)",
    )
    bench.add_argument("--batch-size", type=int, default=16, help="prompts per batch (default: 16)")
    bench.add_argument("--quick", action="store_true", help="fewer prompts (see --prompts); on the CPU, skip compile")
    bench.add_argument("--orchestrator", action="store_true", help="time a scan with no-op UNet and text encoder")
    bench.add_argument("--json", help="also write the results to this JSON file")
    bench.set_defaults(handler=cmd_bench)

    generate = commands.add_parser(
        "generate",
        help="generate images for a prompt (CFG DDIM), with a JSON sidecar",
        description="Generate one image per seed, batched, as StableDiffusionPipeline does; writes PNGs and generation.json.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    generate.add_argument("prompt", help="the prompt")
    generate.add_argument("--out", required=True, help="output folder for seed-N.png and generation.json")
    _add_generation_options(generate)
    _add_model_options(generate, engine_help=None)  # the pipeline runs the torch UNet
    generate.set_defaults(handler=cmd_generate)

    from .mitigate import METHODS

    mitigate = commands.add_parser(
        "mitigate",
        help="mitigate a memorized prompt; before/after images side by side",
        description="Optimize the prompt embedding (the paper's method) or apply a random baseline, then generate "
        "from the same seeds before and after. Scores are first-step magnitudes on those seeds' latents.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mitigate.add_argument("prompt", help="the prompt")
    mitigate.add_argument("--out", required=True, help="output folder for the before/after grid and the JSON report")
    mitigate.add_argument("--method", choices=METHODS, default="embed", help="embed (the paper's; default) or a baseline")
    _add_mitigation_options(mitigate)
    _add_generation_options(mitigate)
    mitigate.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_model_options(mitigate, engine_help=None)  # the optimization needs autograd: torch
    mitigate.set_defaults(handler=cmd_mitigate)

    explain = _add_command(
        commands,
        "explain",
        cmd_explain,
        help="show which words make prompts memorized",
        description="Score prompts and attribute the score to their words (method.md, Explanation).",
    )
    explain.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts to explain")
    explain.add_argument("--input", metavar="FILE", help="also explain every prompt of FILE (.txt, .jsonl, .csv, .parquet)")
    explain.add_argument("--field", help="jsonl/csv/parquet field holding the prompt (default: prompt, caption or text)")
    explain.add_argument(
        "--method",
        choices=("grad", "ablation"),
        default="grad",
        help="grad: gradient significance (default); ablation: score drop when each word is left out",
    )
    explain.add_argument("--json", action="store_true", help="one JSON object per prompt, per line")
    explain.add_argument(
        "--color", choices=("auto", "always", "never"), default="auto", help="colour words (auto: when stdout is a terminal)"
    )
    _add_threshold_options(explain, " (the verdict printed with each prompt)")

    serve = _add_command(
        commands,
        "serve",
        cmd_serve,
        help="HTTP API and interactive prompt page",
        description=(
            "Serve POST /v1/score, POST /v1/explain, POST /v1/mitigate, GET /healthz and the prompt page at /, "
            "with the model loaded once. API schema: /docs and /openapi.json."
        ),
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    _add_threshold_options(serve, " (the page shows the verdict)")

    from .cli_calibrate import add_calibrate_command
    from .cli_sweep import add_sweep_command
    from .cli_testbed import add_testbed_commands

    add_calibrate_command(commands, _add_command)
    add_sweep_command(commands, _add_command, _add_threshold_options)
    add_testbed_commands(commands, _add_model_options, _add_detect_options, _add_generation_options, _add_mitigation_options)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `memscan` command; returns the exit code."""
    # Before transformers is imported: its import-time notices (e.g. torchvision missing) are not the user's concern.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (MemscanError, EngineUnavailable) as exc:
        print(f"memscan: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("memscan: interrupted; re-run the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:  # a bug: say so under the traceback instead of leaving a bare one
        traceback.print_exc()
        print("memscan: internal error (a bug): please report it with the traceback above", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
