"""`memscan testbed build`, `finetune`, `eval`, `eval-mitigation` and `demo`: the commands of the bundled testbed."""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

from ..errors import MemscanError
from .common import (
    EXIT_OK,
    add_detect_options,
    add_model_options,
    command_parser,
    load_scanner,
    output_file,
    output_folder,
    positive,
    quiet_libraries,
    scanner_and_detector,
    writing,
)
from .generation import METHOD_NAMES, add_generation_options, add_mitigation_options, check_generation_options, mitigation_plan
from .progress import bar

DEMO_TOP = 10


def _method_list(text: str) -> list[str]:
    methods = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"methods are comma-separated names of {', '.join(METHOD_NAMES)}; got {text!r}")
    return methods


def _write_json(path: Path, payload: dict) -> None:
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def _plot_file(path: str | None) -> Path | None:
    """`--plot`, checked before the scoring: a format matplotlib writes, in a writable folder."""
    if path is None:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    return output_file(path, tuple(f".{ext}" for ext in FigureCanvasAgg.get_supported_filetypes()))


def cmd_testbed_build(args: argparse.Namespace) -> int:
    """Train the testbed model into --out."""
    from dataclasses import replace

    from ..testbed.build import build_config, build_testbed

    quiet_libraries()  # the ground truth's pipeline would log every truncated random-token prompt
    cfg = build_config(args.family, args.smoke, args.dose)
    if positive(args.threads, "--threads") is not None:
        cfg = replace(cfg, threads=args.threads)
    output_folder(args.out)
    command = "memscan testbed build" + (f" --family {args.family}" if args.family != "sd" else "")
    command += f" --out {shlex.quote(args.out)} --seed {args.seed}"
    command += " --dose" * args.dose + " --smoke" * args.smoke + (f" --threads {args.threads}" if args.threads is not None else "")
    stats = build_testbed(args.out, seed=args.seed, cfg=cfg, log=lambda line: print(line, flush=True), command=command)
    gt = stats["groundtruth"]
    by_copies = gt.get("planted_reproduced_by_copies")
    print(
        f"built {args.out} in {stats['total_seconds'] / 60:.1f} min ({stats['bundle_bytes'] / 2**20:.1f} MB): "
        f"planted reproduced {gt['planted_reproduced']:.1%}"
        + (" (" + ", ".join(f"{share:.0%} at {n}x" for n, share in by_copies.items()) + ")" if by_copies else "")
        + f", normal close to training {gt['normal_close_to_training']:.1%}"
    )
    return EXIT_OK


def cmd_finetune(args: argparse.Namespace) -> int:
    """Train the testbed recipe with or without the memorization filter (or compare two runs)."""
    from dataclasses import replace

    from ..testbed.build import SMOKE_CONFIG, BuildConfig
    from ..testbed.filtering import SMOKE_FILTER, FilterSettings
    from ..testbed.finetune import REPORT, REPORT_KEYS, comparison_table, evaluate_build, run_finetune

    if args.compare:
        unfiltered, filtered = (_read_json(Path(path)) for path in args.compare)
        if not all(isinstance(r, dict) and REPORT_KEYS <= set(r) for r in (unfiltered, filtered)) or \
                unfiltered["filtered"] or not filtered["filtered"]:
            raise MemscanError(f"--compare takes UNFILTERED FILTERED: the {REPORT} of a --no-filter run, then of a filtered one")
        print(comparison_table(unfiltered, filtered, args.overhead and _read_json(Path(args.overhead))))
        return EXIT_OK
    if not args.out:
        raise MemscanError("--out is required (unless --compare)")
    if args.from_build and not args.no_filter:
        raise MemscanError("--from-build measures an unfiltered build: give --no-filter too")
    if not 0.0 < args.quantile <= 1.0:
        raise MemscanError(f"--quantile must be in (0, 1], got {args.quantile}")
    cfg = SMOKE_CONFIG if args.smoke else BuildConfig()
    given = {"train_steps": positive(args.train_steps, "--train-steps"), "threads": positive(args.threads, "--threads")}
    cfg = replace(cfg, **{k: v for k, v in given.items() if v is not None})
    output_folder(args.out)
    filtering = None if args.no_filter else replace(SMOKE_FILTER if args.smoke else FilterSettings(),
                                                    quantile=args.quantile, seed=args.seed)
    quiet_libraries()
    command = _finetune_command(args)
    if args.from_build:
        report = evaluate_build(args.from_build, args.out, args.seed, cfg, command=command)
    else:
        report = run_finetune(args.out, args.seed, cfg, filtering, log=lambda line: print(line, flush=True),
                              command=command)
    dropped = report["filter"]["dropped_share"] if report["filter"] else {"planted": 0.0, "normal": 0.0}
    print(
        f"{'filtered' if report['filtered'] else 'unfiltered'}: planted reproduced {report['planted_reproduced']:.1%}, "
        f"held-out normal loss {report['held_out_normal_loss']:.4f}, "
        f"colour shown {report['attributes']['named_colour_shown']:.1%} (another colour {report['attributes']['other_colour_shown']:.1%}), "
        f"dropped planted {dropped['planted']:.1%} normal {dropped['normal']:.2%}; wrote {Path(args.out) / REPORT}"
    )
    return EXIT_OK


def _finetune_command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run, for its report."""
    words = ["memscan", "finetune", "--out", args.out, "--seed", str(args.seed)]
    words += ["--no-filter"] if args.no_filter else ["--quantile", str(args.quantile)]
    words += ["--smoke"] * args.smoke + ["--from-build", args.from_build] * bool(args.from_build)
    words += [w for opt in ("train_steps", "threads") if getattr(args, opt) is not None
              for w in (f"--{opt.replace('_', '-')}", str(getattr(args, opt)))]
    return shlex.join(words)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MemscanError(f"cannot read {path}: {exc}") from exc


def _evaluate(args: argparse.Namespace, labels: str, detector: str = "wen"):
    from ..evaluate import evaluate, read_labelled_prompts

    rows = read_labelled_prompts(labels)  # input errors before the slow model load
    scanner, chosen = scanner_and_detector(args, detector)
    with bar("scoring", total=len(rows)) as progress:
        return evaluate(scanner, rows, batch_size=args.batch_size, progress=progress.update, detector=chosen)


def _print_summary(summary: dict) -> None:
    print(
        f"AUC {summary['auc']:.3f}  TPR@1%FPR {summary['tpr_at_1pct_fpr']:.3f}  ACC {summary['acc']:.3f}  "
        f"({summary['n_pos']} memorized, {summary['n_neg']} normal)"
    )
    for kind, entry in summary["per_kind"].items():
        against = f"  AUC vs memorized {entry['auc_vs_positives']:.3f}" if "auc_vs_positives" in entry else ""
        print(f"  {kind:<26} n={entry['n']:<4} mean score {entry['mean_score']:.3f}{against}")


def cmd_eval(args: argparse.Namespace) -> int:
    """Score labelled prompts with a detector and write the metrics."""
    from ..evaluate import plot_evaluation, write_scores
    from ..testbed import default_labels_path

    labels = args.labels or str(default_labels_path())
    json_path, plot = output_file(args.json), _plot_file(args.plot)  # before the scoring, not after it
    scores_path = output_file(args.scores) if args.scores else None
    evaluation = _evaluate(args, labels, args.detector)
    evaluation.summary.update(model=args.model, labels=labels)
    _write_json(json_path, evaluation.summary)
    if scores_path:
        with writing(scores_path):
            write_scores(evaluation, scores_path)
    if plot:
        with writing(plot):
            plot_evaluation(evaluation, plot)
    _print_summary(evaluation.summary)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """Scan a testbed's evaluation prompts with its model (the bundled sd testbed unless --model)."""
    from ..evaluate import plot_evaluation, write_scores
    from ..testbed import default_model_path

    out = output_folder(args.out)
    name = args.model or "the bundled testbed"
    args.model = args.model or str(default_model_path())
    labels = Path(args.model) / "eval_prompts.jsonl"
    if not labels.is_file():
        raise MemscanError(f"{args.model} is not a testbed built by `memscan testbed build` (no eval_prompts.jsonl)")
    started = time.time()
    evaluation = _evaluate(args, str(labels))
    print(f"scanned {len(evaluation.rows)} prompts with {name} in {time.time() - started:.1f} s")
    _print_summary(evaluation.summary)
    print(f"top {DEMO_TOP} prompts by memorization score (label 1 = planted, memorized):")
    for row, score in evaluation.top(DEMO_TOP):
        print(f"  {score:7.3f}  label {row['label']}  {row['prompt'][:70]}")
    _write_json(out / "summary.json", evaluation.summary)
    with writing(out):
        write_scores(evaluation, out / "scores.jsonl")
        plot_evaluation(evaluation, out / "roc.png")
    print(f"wrote {out / 'scores.jsonl'}, {out / 'summary.json'}, {out / 'roc.png'}")
    return EXIT_OK


def cmd_eval_mitigation(args: argparse.Namespace) -> int:
    """Mitigate planted and normal testbed prompts with each method and tabulate the outcome."""
    from ..detect import DetectSettings
    from ..testbed.build import load_build_data
    from ..testbed.mitigation_eval import evaluate_mitigation, markdown_table, select_cases

    if args.normal < 0:
        raise MemscanError(f"--normal must be >= 0, got {args.normal}")
    check_generation_options(args)
    json_path = output_file(args.json)  # both before the evaluation, which takes minutes to hours
    markdown = output_file(args.markdown) if args.markdown else None
    plan = mitigation_plan(args)
    quiet_libraries()
    data = load_build_data(args.model)
    scanner = load_scanner(args, DetectSettings(num_inference_steps=args.inference_steps))
    settings = plan.settings(scanner)
    started = time.time()
    with bar("eval-mitigation", total=len(select_cases(data, args.normal))) as progress:
        report = evaluate_mitigation(scanner, data, args.methods, settings, args.seeds, args.normal, args.guidance_scale,
                                     progress=progress.update)
    report.update(model=args.model, fingerprint=scanner.model.fingerprint, seconds=round(time.time() - started, 1))
    _write_json(json_path, report)
    table = markdown_table(report)
    if markdown:
        with writing(markdown):
            markdown.write_text(table + "\n", encoding="utf-8")
    print(table)
    print(f"named colour shown by chance (another colour): {report['chance_attribute_rate']:.1%}; target {settings.target:.4f}, "
          f"lr {settings.learning_rate}, at most {settings.max_iterations} iterations")
    return EXIT_OK


def add_testbed_commands(commands: argparse._SubParsersAction) -> None:
    """Register `testbed build`, `finetune`, `eval`, `eval-mitigation` and `demo` on the `memscan` subparsers."""
    testbed = command_parser(commands, "testbed", None, help="the bundled test model with planted memorization")
    testbed_commands = testbed.add_subparsers(dest="testbed_command", required=True, metavar="COMMAND")
    build = command_parser(
        testbed_commands, "build", cmd_testbed_build, help="train the testbed model (deterministic for a seed and device)"
    )
    build.add_argument("--family", choices=("sd", "sd3"), default="sd",
                       help="sd: a UNet, epsilon prediction (StableDiffusionPipeline; default); "
                       "sd3: an SD 3 transformer, rectified flow (StableDiffusion3Pipeline without T5)")
    build.add_argument("--out", required=True, help="output folder (the family's pipeline layout)")
    build.add_argument("--seed", type=int, default=0, help="seed of data, initialization and training (default: 0)")
    build.add_argument("--dose", action="store_true",
                       help="the detector benchmark: 120 planted captions, 20 at each of 1, 2, 4, 8, 16 and 32 copies; "
                       "groundtruth_labels.jsonl labels each by its generations")
    build.add_argument("--smoke", action="store_true", help="tiny sizes and a few steps (for CI)")
    build.add_argument("--threads", type=int, help="torch CPU threads (default: the build config's)")

    finetune = command_parser(
        commands, "finetune", cmd_finetune,
        help="train the testbed recipe with the memorization filter (or without) and measure it",
        description=(
            "Train the testbed's recipe (its data, seed and steps) with the training-time memorization filter\n"
            "(a sample is dropped from the loss when its text-conditional magnitude reaches the --quantile of\n"
            "normal training pairs' magnitudes in its timestep bin, re-fitted every 100 steps) or without it\n"
            "(--no-filter: exactly `memscan testbed build`). Saves the pipeline into --out and writes\n"
            "--out/finetune.json: planted reproduction rate, held-out normal loss, colour attribute check,\n"
            "samples dropped, wall time."
        ),
    )
    finetune.add_argument("--out", help="output folder (pipeline and finetune.json)")
    finetune.add_argument("--no-filter", action="store_true", help="train without the filter (the testbed build)")
    finetune.add_argument("--quantile", type=float, default=0.99,
                          help="threshold: this quantile of normal pairs' magnitudes per timestep bin (default: 0.99)")
    finetune.add_argument("--seed", type=int, default=0, help="seed of data, initialization and training (default: 0)")
    finetune.add_argument("--train-steps", type=int, help="training steps (default: the recipe's)")
    finetune.add_argument("--smoke", action="store_true", help="tiny sizes and a few steps (for CI)")
    finetune.add_argument("--threads", type=int, help="torch CPU threads (default: the recipe's)")
    finetune.add_argument("--from-build", metavar="DIR",
                          help="with --no-filter: measure this existing testbed build of the same recipe instead of training")
    finetune.add_argument("--compare", nargs=2, metavar=("UNFILTERED", "FILTERED"),
                          help="print the Markdown table of two runs' finetune.json files and exit")
    finetune.add_argument("--overhead", metavar="JSON",
                          help="with --compare: add the timing row from bench/finetune_overhead.py --json")

    evaluate = command_parser(commands, "eval", cmd_eval, help="AUC / TPR@1%%FPR of the detector on labelled prompts")
    evaluate.add_argument("--labels", help="JSONL with prompt, label (1 memorized, 0 normal), kind (default: the testbed's)")
    evaluate.add_argument("--json", required=True, help="where to write the metrics")
    evaluate.add_argument("--plot", help="PNG with the ROC curve and score histograms")
    evaluate.add_argument("--scores", help="JSONL with one row per labelled prompt: prompt, label, kind, score")
    add_model_options(evaluate)
    add_detect_options(evaluate, detector=True)

    mitigation = command_parser(
        commands, "eval-mitigation", cmd_eval_mitigation,
        help="memorization rate, fidelity and time of each mitigation method on the testbed",
    )
    mitigation.add_argument("--methods", type=_method_list, default=list(METHOD_NAMES),
                            help=f"comma-separated methods (default: {','.join(METHOD_NAMES)})")
    add_mitigation_options(mitigation)
    mitigation.add_argument("--normal", type=int, default=50, help="prompts of each normal kind (default: 50)")
    mitigation.add_argument("--json", required=True, help="where to write the report")
    mitigation.add_argument("--markdown", help="where to write the table (markdown)")
    add_generation_options(mitigation)
    add_model_options(mitigation, engine_help=None)  # the optimization needs autograd: torch

    demo = command_parser(
        commands, "demo", cmd_demo, help="scan the bundled evaluation prompts with the bundled testbed model"
    )
    demo.add_argument("--out", default="memscan-demo", help="folder for scores.jsonl, summary.json, roc.png")
    demo.add_argument("--model", help="a testbed folder (e.g. scanner/data/testbed_sd3; default: the bundled sd testbed)")
    add_detect_options(demo)
    demo.set_defaults(device="auto", dtype="auto", engine="torch", threads=None)
