"""What every `memscan` command shares: exit codes, output checks, the model and detection
options, and the one place a `Scanner` and its flagging threshold are built from them.

Nothing here imports torch at import time: `memscan --help` and `--version` stay fast.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import MemscanError

if TYPE_CHECKING:
    from ..calibration import Threshold
    from ..detect import Scanner, ScannerSpec
    from ..detectors import Detector
    from ..scores import DetectSettings

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_FLAGGED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

# The names of `scanner.engines.ENGINES`, spelled out because importing that package imports
# torch; tests/test_cli_package.py keeps the two equal.
ENGINE_NAMES = ("torch", "compile", "onnx", "tensorrt")
DETECTOR_NAMES = ("wen", "anisotropy", "sail", "attention-entropy", "nemo-ssim")  # scanner.detectors.DETECTORS
ENGINE_HELP = f"UNet backend: {', '.join(ENGINE_NAMES)} (default: torch)"

Handler = Callable[[argparse.Namespace], int]


def exit_codes_help(flagged: bool = False, resumable: bool = False) -> str:
    """The `exit codes:` epilog of a command that can exit 3 (`flagged`) or be resumed after 130 (`resumable`)."""
    lines = [
        "exit codes:",
        "  0    success",
        "  1    internal error (a bug; please report it with the traceback)",
        "  2    usage or input error (bad option, missing file, bad model, unwritable output)",
    ]
    if flagged:
        lines.append("  3    prompts flagged and --fail-on-flagged given")
    lines.append("  130  interrupted" + (" (re-run the same command to resume)" if resumable else ""))
    return "\n".join(lines)


def command_parser(
    commands: argparse._SubParsersAction, name: str, handler: Handler | None, *, flagged: bool = False,
    resumable: bool = False, **kwargs: str,
) -> argparse.ArgumentParser:
    """A subcommand whose --help ends with the exit codes it can return; `kwargs` as for `add_parser`."""
    command = commands.add_parser(
        name, epilog=exit_codes_help(flagged, resumable), formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs
    )
    if handler is not None:  # a group of subcommands leaves the handler to them
        # `main` words the interrupted message after `resumable`.
        command.set_defaults(handler=handler, resumable=resumable)
    return command


def model_command(
    commands: argparse._SubParsersAction, name: str, handler: Handler, *, engine_help: str = ENGINE_HELP,
    engine: str = "torch", flagged: bool = False, resumable: bool = False, detector: bool = False, **kwargs: str,
) -> argparse.ArgumentParser:
    """A subcommand that scores prompts: the model and detection options (with `detector`, --detector) come with it."""
    command = command_parser(commands, name, handler, flagged=flagged, resumable=resumable, **kwargs)
    add_model_options(command, engine_help, engine)
    add_detect_options(command, detector)
    return command


def output_file(path: str, suffixes: Sequence[str] = (), create_parent: bool = True) -> Path:
    """`path` as a file to write at the end of long work, checked now: a folder is refused, its folder made
    (or, unless `create_parent`, required to exist) and proved writable."""
    target = Path(path)
    if suffixes and target.suffix.lower() not in suffixes:
        raise MemscanError(f"{target}: the file name must end in one of {', '.join(suffixes)}")
    if target.is_dir():
        raise MemscanError(f"{target} is a folder, not a file")
    if not create_parent and not target.parent.is_dir():
        raise MemscanError(f"{target}: output folder {target.parent} does not exist")
    with writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        prove_writable(target.parent)
    return target


def output_folder(path: str, create: bool = True) -> Path:
    """`path` as an output folder, checked now: a file there is refused; made now unless `create` is False,
    in which case the nearest existing folder above it must take new files."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise MemscanError(f"{out} exists and is not a folder")
    existing = out if create else next(folder for folder in (out, *out.absolute().parents) if folder.exists())
    with writing(out):
        if create:
            out.mkdir(parents=True, exist_ok=True)
        prove_writable(existing)
    return out


def prove_writable(folder: Path) -> None:
    """Create and delete a file in `folder`: permission bits alone miss read-only mounts, /proc, and root."""
    with tempfile.TemporaryFile(dir=folder):
        pass


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn a failure to write `path` into a one-line `MemscanError`."""
    try:
        yield
    except OSError as exc:
        raise MemscanError(f"cannot write {path}: {exc.strerror or exc}") from exc


def positive(value: int | None, option: str) -> int | None:
    """An optional count option: None (not given) or >= 1."""
    if value is not None and value < 1:
        raise MemscanError(f"{option} must be >= 1, got {value}")
    return value


def quiet_libraries() -> None:
    """Silence load-time chatter of diffusers/transformers; memscan reports what matters."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for logging in (diffusers_logging, transformers_logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def default_model() -> str:
    """The bundled testbed's folder: the default `--model`."""
    from ..testbed import default_model_path

    return str(default_model_path())


def add_model_options(parser: argparse.ArgumentParser, engine_help: str | None = ENGINE_HELP, engine: str = "torch") -> None:
    """--model, --device, --dtype and (unless `engine_help` is None: commands that need autograd, which run
    the torch UNet) --engine, default `engine`."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model", default=default_model(), help="diffusers pipeline folder, or a hub id in the local HF cache (default: the bundled testbed)"
    )
    group.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N (default: auto)")
    group.add_argument("--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16")
    group.add_argument(
        "--threads", type=int,
        help="CPU threads of torch, or a scan plan's runs side by side (default: $OMP_NUM_THREADS, else every CPU "
        "this process may use; idle threads sleep)",
    )
    if engine_help is None:
        parser.set_defaults(engine="torch")
    else:
        group.add_argument("--engine", default=engine, help=engine_help)


def add_trajectory_options(group: argparse._ActionsContainer) -> None:
    """--inference-steps and --guidance-scale: the DDIM trajectory that is scored or generated."""
    group.add_argument("--inference-steps", type=int, default=50, help="DDIM inference steps: the trajectory's length (default: 50)")
    group.add_argument(
        "--guidance-scale", type=float, default=None,
        help="classifier-free guidance scale (default: the model family's, as its diffusers pipeline has it: 7.5 for "
        "SD 1.x/2.x, README's families table for the others; the first step's score does not depend on it)",
    )


def add_detect_options(parser: argparse.ArgumentParser, detector: bool = False) -> None:
    """The detection settings: which steps of which trajectory are scored, from which latents, in which batches
    (and, with `detector`, by which detector)."""
    group = parser.add_argument_group("detection")
    if detector:
        add_detector_option(group)
    group.add_argument("--steps", type=int, default=1, help="score sampling steps [0, N) (default: 1, the first step)")
    add_trajectory_options(group)
    group.add_argument("--generations", type=int, default=1, help="initial latents per prompt (default: 1)")
    group.add_argument("--seed", type=int, default=0, help="seed of the initial latents (default: 0)")
    group.add_argument(
        "--noise",
        choices=("shared", "reference"),
        default="shared",
        help="shared: the same latents for every prompt (default); reference: seed = row index + seed, as the paper's code",
    )
    group.add_argument(
        "--score-space",
        choices=("auto", "epsilon", "model"),
        default="auto",
        help="where the difference is measured: epsilon (noise), model (the raw output: the velocity for flow models); "
        "auto (default): epsilon for diffusion families, model for flow families (SD3, Flux)",
    )
    group.add_argument(
        "--batch-size", type=int,
        help="prompts per denoiser batch (default: 64 on CUDA; on the CPU 16, up to 256 for small latents)",
    )


def add_detector_option(group: argparse._ActionsContainer) -> None:
    """`--detector NAME`: which detector scores (its name and settings join the settings record)."""
    group.add_argument(
        "--detector", choices=DETECTOR_NAMES, default="wen",
        help="wen (default: the guidance magnitude), or a later detector (docs/detectors.md)",  # as eval's: one meaning
    )


def check_detector(name: str, engine: str) -> None:
    """Refuse, before the slow load, a detector that needs the eager torch denoiser with another engine."""
    from ..detectors import DETECTORS

    reason = DETECTORS[name].eager_only
    if reason and engine != "torch":
        raise MemscanError(f"--detector {name} needs --engine torch: {reason}")


def add_format_option(parser: argparse.ArgumentParser, json_help: str) -> None:
    """`--format text|json` for a command that prints its result (`--json` always names a file to write)."""
    parser.add_argument("--format", choices=("text", "json"), default="text", help=f"text (default) or {json_help}")


def add_threshold_options(parser: argparse.ArgumentParser, flagged: str = "") -> None:
    """`--threshold` or `--calibration` (not both): where the flagging threshold comes from."""
    group = parser.add_argument_group("flagging").add_mutually_exclusive_group()
    group.add_argument("--threshold", type=float, help=f"flag prompts whose score is >= this{flagged}")
    group.add_argument(
        "--calibration",
        metavar="FILE",
        help="take the threshold from `memscan calibrate`'s FILE (refused for another model or other settings); "
        "default: the model folder's own calibration.json when it was made for this model and these settings",
    )
    group.add_argument(
        "--no-calibration", action="store_true", help="do not apply the model folder's calibration.json: no verdict"
    )


def detect_settings(args: argparse.Namespace) -> DetectSettings:
    """`DetectSettings` from the detection options."""
    from ..scores import DetectSettings

    if args.batch_size is not None and args.batch_size < 1:
        raise MemscanError(f"--batch-size must be >= 1, got {args.batch_size}")
    return DetectSettings(
        num_inference_steps=args.inference_steps,
        end_step=args.steps,
        generations=args.generations,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        noise=args.noise,
        score_space=args.score_space,
    )


def scanner_spec(args: argparse.Namespace, settings: DetectSettings | None = None, engine: str | None = None) -> ScannerSpec:
    """The scanner the options describe, checked but not loaded; `settings` and `engine` (default: the options')
    for commands that score with fixed settings or elsewhere (Ray workers)."""
    from ..detect import ScannerSpec

    return ScannerSpec(
        args.model, detect_settings(args) if settings is None else settings, args.device, args.dtype, engine or args.engine
    )


def start_loading(args: argparse.Namespace) -> None:
    """Check the model folder, device, dtype and thread count, set the threads, then say on stderr that the
    slow load starts (so a quiet terminal is not taken for a hang, and a bad option is still a one-line error)."""
    from ..families import family_for
    from ..io.weights import check_weights
    from ..model import resolve_device, resolve_dtype, resolve_model_path
    from ..threads import apply_threads

    path = resolve_model_path(args.model)
    family_for(path)  # the folder's family and its own refusals
    check_weights(path)  # truncated or pickle-only weights: one line, before the slow load
    resolved = resolve_device(args.device)
    resolve_dtype(args.dtype, resolved)
    threads = apply_threads(positive(args.threads, "--threads"))
    print(f"memscan: loading model {args.model} on {resolved} ({threads.describe()}) ...", file=sys.stderr, flush=True)


def load_scanner(args: argparse.Namespace, settings: DetectSettings | None = None) -> Scanner:
    """The one place a command's `Scanner` is built: checked first, then loaded; `settings` as for `scanner_spec`."""
    spec = scanner_spec(args, settings)  # option errors before the slow load
    start_loading(args)
    quiet_libraries()
    scanner = spec.load()
    if "batch_size" in vars(args) and args.batch_size is None:
        from ..model import default_batch_size

        args.batch_size = default_batch_size(scanner.model.device, scanner.model.latent_shape)
    if "guidance_scale" in vars(args) and args.guidance_scale is None:
        # The generating commands read the option itself once the scanner is loaded: the family's default.
        args.guidance_scale = scanner.family.default_guidance_scale
    return scanner


def threshold_resolver(args: argparse.Namespace) -> Callable[[str, str, dict], Threshold]:
    """The one resolution of the flagging options of `scan`, `explain`, `serve` and `sweep`: reads `--calibration`
    now (before the slow load), and returns `(model folder, fingerprint, settings record) -> Threshold` to call
    once the model is known; a model calibration that does not apply is said on stderr, in one line."""
    from ..calibration import choose_threshold, load_calibration

    calibration = load_calibration(args.calibration) if args.calibration else None

    def resolve(model_path: str, fingerprint: str, settings: dict) -> Threshold:
        return choose_threshold(
            fingerprint, settings, threshold=args.threshold, calibration=calibration, calibration_file=args.calibration,
            model_path=model_path, use_model_calibration=not args.no_calibration,
            warn=lambda line: print(f"memscan: {line}", file=sys.stderr, flush=True),
        )

    return resolve


def scanner_and_detector(args: argparse.Namespace, detector: str) -> tuple[Scanner, Detector | None]:
    """The scanner and the detector `detector` over it (None for wen: the scanner's own score)."""
    from ..detectors import create_detector

    check_detector(detector, args.engine)
    scanner = load_scanner(args)
    # wen stays the scanner itself: its score per generation, and reference noise too.
    return scanner, None if detector == "wen" else create_detector(detector, scanner)


def scanner_detector_and_threshold(args: argparse.Namespace, detector: str) -> tuple[Scanner, Detector | None, Threshold]:
    """`scanner_and_detector` and the flagging threshold, resolved against the settings record naming the detector."""
    from ..scan import scanner_settings

    resolve = threshold_resolver(args)
    scanner, chosen = scanner_and_detector(args, detector)
    return scanner, chosen, resolve(scanner.model.source, scanner.model.fingerprint, scanner_settings(scanner, chosen))


def scanner_and_threshold(args: argparse.Namespace) -> tuple[Scanner, Threshold]:
    """The scanner and its flagging threshold for Wen's score (the commands without --detector)."""
    scanner, _, threshold = scanner_detector_and_threshold(args, "wen")
    return scanner, threshold
