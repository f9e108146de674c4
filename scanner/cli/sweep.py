"""`memscan sweep`: score only the prompts a store has not seen, keep them, report the sweep."""

from __future__ import annotations

import argparse
import sys

from ..errors import MemscanError
from .common import EXIT_FLAGGED, EXIT_OK, add_threshold_options, model_command, scanner_detector_and_threshold


def cmd_sweep(args: argparse.Namespace) -> int:
    """Score the prompts new to the store, add them, and report."""
    from tqdm import tqdm

    from ..sweep import SweepStore, prepare_report_dir, run_sweep, usable_inputs, write_report
    from ..threads import current_threads

    if args.checkpoint_rows < 1 or args.top < 0:
        raise MemscanError("--checkpoint-rows must be >= 1 and --top >= 0")
    # Everything that can fail on the user's side fails here, before the slow model load.
    paths, rejected_files = usable_inputs(args.inputs, args.field)
    report_dir = prepare_report_dir(args.report) if args.report else None
    with SweepStore(args.store, wait_s=args.wait) as store:
        scanner, detector, chosen = scanner_detector_and_threshold(args, args.detector)
        threshold = chosen.value
        with tqdm(desc="sweeping", unit=" prompts", disable=None, dynamic_ncols=True) as bar:
            summary = run_sweep(
                scanner,
                store,
                paths,
                rejected_files,
                field=args.field,
                batch_size=args.batch_size,
                threshold=threshold,
                progress=bar.update,
                commit_rows=args.checkpoint_rows,
                detector=detector,
            )
        report = None
        if report_dir is not None:
            report = write_report(
                store, summary, scanner, report_dir, threshold_source=chosen.source, top=args.top, detector=detector
            )
    flagged = "n/a (no threshold)" if summary.flagged is None else f"{summary.flagged} ({chosen.describe()})"
    print(
        f"sweep {summary.sweep}{' (resumed)' if summary.resumed else ''}: {summary.rows} rows, {summary.new} new, "
        f"{summary.known} already known, {summary.rejected} rejected, flagged {flagged}; "
        f"{summary.prompts_per_s:.1f} prompts/s ({current_threads().describe()})"
        + (f" -> {report_dir / report['files']['html']}" if report else "")
    )
    for row in rejected_files:
        print(f"memscan: rejected {row.id}: {row.error}", file=sys.stderr)
    return EXIT_FLAGGED if args.fail_on_flagged and summary.flagged else EXIT_OK


def add_sweep_command(commands: argparse._SubParsersAction) -> None:
    """Register `sweep` on the `memscan` subparsers."""
    sweep = model_command(
        commands,
        "sweep",
        cmd_sweep,
        flagged=True,
        resumable=True,
        detector=True,
        help="score only the prompts a store has not seen, keep them, report the sweep",
        description=(
            "Score the prompts of the inputs that the SQLite --store does not hold yet for this model and\n"
            "settings, --detector included (prompts normalized: Unicode NFC, whitespace runs made one space,\n"
            "stripped), add them, and write a dated HTML and JSON report into --report. A killed sweep\n"
            "resumes when the same command is re-run; a file that cannot be read is rejected with its reason,\n"
            "the others are swept.\n"
            "One sweep writes to a store at a time: another waits up to --wait seconds, then exits 2."
        ),
    )
    sweep.add_argument("inputs", nargs="+", metavar="INPUT", help=".txt (a prompt a line), .jsonl, .csv or .parquet")
    sweep.add_argument("--store", required=True, metavar="DB", help="SQLite store of scored prompts (created if missing)")
    sweep.add_argument("--report", metavar="DIR", help="folder for sweep-ID-DATE.html, .json and .rejects.jsonl")
    sweep.add_argument("--field", help="jsonl/csv/parquet field holding the prompt (default: prompt, caption or text)")
    add_threshold_options(sweep)
    sweep.add_argument("--fail-on-flagged", action="store_true", help="exit with code 3 when a new prompt is flagged")
    sweep.add_argument("--top", type=int, default=10, help="flagged prompts explained word by word in the report (default: 10)")
    sweep.add_argument("--wait", type=float, default=60.0, help="seconds to wait for another sweep's store lock (default: 60)")
    sweep.add_argument("--checkpoint-rows", type=int, default=2048, help="commit to the store at least every N prompts (and every 30 s)")
