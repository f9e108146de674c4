"""The `memscan` parser, every subcommand registered on it, and the entry point that maps outcomes to exit codes."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from .. import __version__
from ..errors import MemscanError
from ..threads import prefer_passive_wait
from .bench import add_bench_command
from .calibrate import add_calibrate_command
from .common import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE
from .explain import add_explain_command
from .generation import add_generation_commands
from .scan import add_scan_command
from .serve import add_serve_command
from .sweep import add_sweep_command
from .testbed import add_testbed_commands

EXIT_CODES_HELP = """exit codes (each command's --help lists its own):
  0    success
  1    internal error (a bug; please report it with the traceback)
  2    usage or input error (bad option, missing file, bad model, unwritable output)
  3    prompts flagged and --fail-on-flagged given (scan, sweep)
  130  interrupted (scan and sweep resume when the same command is re-run)"""


def build_parser() -> argparse.ArgumentParser:
    """The `memscan` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="memscan",
        description="Find prompts a text-to-image diffusion model has memorized (Wen et al., ICLR 2024).",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"memscan {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_scan_command(commands)
    add_bench_command(commands)
    add_generation_commands(commands)
    add_explain_command(commands)
    add_serve_command(commands)
    add_calibrate_command(commands)
    add_sweep_command(commands)
    add_testbed_commands(commands)
    return parser


def usage_errors() -> tuple[type[Exception], ...]:
    """The exceptions that are the user's to fix (exit 2, one line)."""
    # An engine that cannot start is one too; its class is looked up only once a command imported the
    # engines, which import torch, so that `memscan --help` does not.
    engines = sys.modules.get("scanner.engines")
    return (MemscanError,) + ((engines.EngineUnavailable,) if engines is not None else ())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `memscan` command; returns the exit code."""
    # Before transformers is imported: its import-time notices (e.g. torchvision missing) are not the user's concern.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    prefer_passive_wait()  # before torch loads: OpenMP reads it once (scanner/threads.py says why)
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("memscan: interrupted" + ("; re-run the same command to resume" if args.resumable else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if isinstance(exc, usage_errors()):
            print(f"memscan: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        # A bug: say so under the traceback instead of leaving a bare one.
        traceback.print_exc()
        print("memscan: internal error (a bug): please report it with the traceback above", file=sys.stderr)
        return EXIT_INTERNAL
