"""`memscan explain`: each prompt's score and the words that make it."""

from __future__ import annotations

import argparse
import sys

from ..errors import MemscanError
from .common import EXIT_OK, add_format_option, add_threshold_options, model_command, scanner_and_threshold
from .progress import bar


def explain_inputs(args: argparse.Namespace) -> list[str]:
    """The prompts from the command line, then those of `--input` (bad rows reported, skipped)."""
    from ..io import check_inputs, read_prompts

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

    from ..explain import explain
    from ..terminal import highlight, suggestion_line, top_words, verdict

    prompts = explain_inputs(args)  # input errors before the slow model load
    scanner, chosen = scanner_and_threshold(args)
    threshold = chosen.value
    print(f"memscan: {chosen.describe()}", file=sys.stderr, flush=True)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    with bar("explaining", total=len(prompts)) as progress:
        for start in range(0, len(prompts), args.batch_size):
            batch = prompts[start : start + args.batch_size]
            for explanation in explain(scanner, batch, args.method, threshold):
                if args.format == "json":
                    print(json.dumps(explanation.to_dict(threshold), ensure_ascii=False), flush=True)
                    continue
                print(verdict(explanation, threshold) + ("  (prompt truncated)" if explanation.truncated else ""))
                print("  " + highlight(explanation, color))
                print(f"  most significant ({args.method}): {top_words(explanation)}", flush=True)
                if explanation.suggestion is not None:
                    print(f"  {suggestion_line(explanation)}", flush=True)
            progress.update(len(batch))
    return EXIT_OK


def add_explain_command(commands: argparse._SubParsersAction) -> None:
    """Register `explain` on the `memscan` subparsers."""
    explain = model_command(
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
        choices=("ablation", "grad"),
        default="ablation",
        help="ablation: score drop when each word is left out (default: the more faithful, docs/explain.md); "
        "grad: gradient significance (the paper's)",
    )
    add_format_option(explain, "json: one JSON object per prompt, per line")
    explain.add_argument(
        "--color", choices=("auto", "always", "never"), default="auto", help="colour words (auto: when stdout is a terminal)"
    )
    add_threshold_options(explain, " (the verdict printed with each prompt)")
