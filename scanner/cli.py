"""`memscan`: the command-line face. Only this module parses arguments, prints and exits.

Stand-in on the testbed branch until main's full CLI (scan, engines) is merged: it carries
the shared option groups and registers the testbed subcommands.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import MemscanError

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_FLAGGED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _quiet_libraries() -> None:
    """Silence load-time chatter of diffusers/transformers; memscan reports what matters."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for logging in (diffusers_logging, transformers_logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    from .testbed import default_model_path

    group = parser.add_argument_group("model")
    group.add_argument("--model", default=str(default_model_path()), help="diffusers pipeline folder (default: the bundled testbed)")
    group.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N (default: auto)")
    group.add_argument("--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16")


def _add_detect_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("detection")
    group.add_argument("--steps", type=int, default=1, help="score sampling steps [0, N) (default: 1, the first step)")
    group.add_argument("--inference-steps", type=int, default=50, help="DDIM inference steps (default: 50)")
    group.add_argument("--generations", type=int, default=1, help="initial latents per prompt (default: 1)")
    group.add_argument("--guidance-scale", type=float, default=7.5, help="CFG scale for steps after the first (default: 7.5)")
    group.add_argument("--seed", type=int, default=0, help="seed of the initial latents (default: 0)")
    group.add_argument("--noise", choices=("shared", "reference"), default="shared",
                       help="shared: the same latents for every prompt (default); reference: seed = row index + seed")
    group.add_argument("--batch-size", type=int, default=256, help="prompts per UNet batch (default: 256)")


def _detect_settings(args: argparse.Namespace):
    from .detect import DetectSettings

    if args.batch_size < 1:
        raise MemscanError(f"--batch-size must be >= 1, got {args.batch_size}")
    return DetectSettings(num_inference_steps=args.inference_steps, end_step=args.steps, generations=args.generations,
                          guidance_scale=args.guidance_scale, seed=args.seed, noise=args.noise)


def build_parser() -> argparse.ArgumentParser:
    """The `memscan` argument parser with every subcommand."""
    from .cli_testbed import add_testbed_commands

    parser = argparse.ArgumentParser(prog="memscan", description="Find prompts a text-to-image diffusion model has memorized.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_testbed_commands(commands, _add_model_options, _add_detect_options)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `memscan` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except MemscanError as exc:
        print(f"memscan: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("memscan: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
