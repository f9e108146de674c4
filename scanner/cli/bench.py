"""`memscan bench`: first-step throughput side by side, or the orchestrator's alone."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import MemscanError
from .common import (
    ENGINE_NAMES, EXIT_OK, add_model_options, command_parser, output_file, positive, quiet_libraries, start_loading, writing,
)


def bench_model(args: argparse.Namespace):
    """The model to time: the SD 1.5-shaped random one of `--sd15`, else `--model`."""
    from ..model import load_model, resolve_device, resolve_dtype
    from ..threads import apply_threads

    quiet_libraries()
    if args.sd15:
        from ..benchmark import sd15_model

        apply_threads(positive(args.threads, "--threads"))
        device = resolve_device(args.device)
        if device.type == "cpu":
            # Measured: 8.3 GB and its warm-up alone unfinished after 8 minutes on a 2-core CPU.
            raise MemscanError("--sd15 is for GPUs: an SD 1.5-shaped UNet needs about 8 GB and minutes per batch "
                               "on a CPU; time the bundled model (the default --model) or run with --device cuda")
        return sd15_model(str(device), resolve_dtype(args.dtype, device))
    start_loading(args)
    return load_model(args.model, device=args.device, dtype=args.dtype)


def cmd_bench(args: argparse.Namespace) -> int:
    """Time first-step detection side by side (modes a-d), or the orchestrator with the scoring a no-op."""
    import json
    import tempfile

    from .. import benchmark
    from ..model import default_batch_size
    from ..threads import current_threads

    if (args.batch_size is not None and args.batch_size < 1) or (args.prompts is not None and args.prompts < 1):
        raise MemscanError("--batch-size and --prompts must be >= 1")
    json_out = output_file(args.json) if args.json else None  # before the timing, not after it
    model = bench_model(args)
    args.batch_size = args.batch_size or default_batch_size(model.device)
    if args.orchestrator:
        count = args.prompts or (20_000 if args.quick else 200_000)
        with tempfile.TemporaryDirectory() as folder:
            result = benchmark.orchestrator_throughput(model, count, args.batch_size, Path(folder))
        print(
            f"orchestrator, {model.source}, scoring a no-op: {result.prompts} prompts, batch {args.batch_size}: "
            f"{result.prompts_per_s:,.0f} prompts/s, {result.prompts_per_cpu_s:,.0f} prompts per CPU second "
            f"({current_threads().describe()}); RSS {result.rss_tenth_mb:.0f} MB at 10%, {result.rss_end_mb:.0f} MB "
            f"at the end, peak {result.peak_rss_mb:.0f} MB (the reading process: {result.reader_peak_rss_mb:.0f} MB)"
        )
        if json_out:
            with writing(json_out):
                row = {"name": "orchestrator (no-op scoring)", **vars(result), "prompts_per_cpu_s": result.prompts_per_cpu_s}
                json_out.write_text(json.dumps([row], indent=2) + "\n")
        return EXIT_OK
    count = args.prompts or args.batch_size * (6 if args.quick else 8)  # medians of 6 batches at least: 3 swung by 31%
    if args.engines is None:
        engines = benchmark.default_engines(model.device, args.quick)
    else:  # --engines "" times modes (a) to (c) only
        engines = [name for name in args.engines.split(",") if name]
    from ..cache import cache_dir

    results = benchmark.compare_modes(
        model,
        benchmark.sample_prompts(count),
        args.batch_size,
        engines,
        cache_dir=cache_dir(),
        on_skip=lambda name, reason: print(f"engine {name} skipped: {reason}", file=sys.stderr),
    )
    threads = current_threads()
    print(f"{model.source}: {count} prompts, batch {args.batch_size}, {model.device}, {model.dtype}, {threads.describe()}")
    if threads.busy:
        print(f"memscan: warning: the machine was busy (load {threads.load_average:.2f} on {threads.cpus} CPUs): "
              "these figures are below what it can do", file=sys.stderr)
    print(benchmark.format_table(results))
    if json_out:
        with writing(json_out):
            benchmark.write_json(results, json_out)
    return EXIT_OK


def add_bench_command(commands: argparse._SubParsersAction) -> None:
    """Register `bench` on the `memscan` subparsers."""
    bench = command_parser(
        commands,
        "bench",
        cmd_bench,
        help="measure first-step throughput: reference-style loop vs scanner vs engines",
        description="Prompts/s of first-step detection, side by side on the same prompts and model, as ratios "
        "to a reference-style loop; or, with --orchestrator, of reading/tokenizing/writing alone.",
    )
    add_model_options(bench, engine_help=None)  # --engines chooses the engines of mode (d)
    bench.add_argument(
        "--sd15", action="store_true", help="an SD 1.5-shaped model with random weights instead of --model (GPU only)"
    )
    bench.add_argument(
        "--engines", help=f"comma-separated engines for mode (d) (default: all of {', '.join(ENGINE_NAMES)} but torch)"
    )
    bench.add_argument(
        "--prompts", type=int,
        help="prompts to time (default: 8 batches, 6 with --quick; with --orchestrator 200,000, 20,000 with --quick)",
    )
    bench.add_argument("--batch-size", type=int, help="prompts per batch (default: 64 on CUDA, 16 on the CPU)")
    bench.add_argument("--quick", action="store_true", help="fewer prompts (see --prompts); on the CPU, skip compile")
    bench.add_argument("--orchestrator", action="store_true", help="time a scan of --model with its scoring a no-op")
    bench.add_argument("--json", help="also write the results to this JSON file")
