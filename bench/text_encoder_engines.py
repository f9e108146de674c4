"""Scoring prompts/s with the onnx engine before and after the text encoders joined it, interleaved in one run.

    OMP_NUM_THREADS=1 python bench/text_encoder_engines.py --prompts 256 --batch-size 32

Modes, timed in turns batch by batch over the same prompts (`scanner.benchmark.interleaved_throughput`,
as `memscan bench`): first-step scoring with the eager scanner, with the onnx engine running the
denoiser only (its text encoder eager, as before) and with the onnx engine running the text
encoder too; then the text encoding alone, eager and onnx. Each mode's ratio and largest relative
difference (the largest absolute one over the reference's largest value) are against the eager
mode of its kind.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from scanner.benchmark import interleaved_throughput, sample_prompts
from scanner.detect import DetectSettings, Scanner
from scanner.engines.base import DenoiserEngine
from scanner.engines.onnx_engine import OnnxEngine
from scanner.model import load_model
from scanner.testbed import default_model_path


class DenoiserOnlyOnnxEngine(OnnxEngine):
    """The onnx engine before the text encoders joined it: they run eagerly."""

    _text_encoder = DenoiserEngine._text_encoder


def main() -> None:
    """Time the modes on the testbed model (or `--model`) and print them with the load average before and after."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(default_model_path()))
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    threads = f"torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    print(f"load average before: {Path('/proc/loadavg').read_text().strip()}; {threads}")
    model = load_model(args.model, device="cpu")
    settings = DetectSettings()
    with tempfile.TemporaryDirectory() as cache:
        eager = Scanner(model, settings)
        onnx = Scanner(model, settings, engine=OnnxEngine(model.family.denoiser_module(), cache, "bench"))
        denoiser_only = Scanner(model, settings, engine=DenoiserOnlyOnnxEngine(model.family.denoiser_module(), cache, "bench"))

        def encoding(scanner: Scanner):
            return lambda batch: scanner.encode_tokens(model.family.tokenize(batch))["encoder_hidden_states"].flatten(1).numpy()

        modes = {
            "score, torch (eager)": lambda batch: eager.score(batch).score,
            "score, onnx denoiser only": lambda batch: denoiser_only.score(batch).score,
            "score, onnx + text encoder": lambda batch: onnx.score(batch).score,
            "encode only, eager": encoding(eager),
            "encode only, onnx": encoding(onnx),
        }
        # Distinct warm-up prompts: a Scanner caches scores by prompt.
        results = interleaved_throughput(modes, sample_prompts(args.prompts), sample_prompts(args.batch_size, args.prompts), args.batch_size)
    print(f"load average after: {Path('/proc/loadavg').read_text().strip()}")
    print(f"{'mode':<28} {'prompts/s':>10} {'spread':>7} {'vs eager':>9} {'max diff / max':>15}")
    for r in results:
        ref = results[0] if r.name.startswith("score") else results[3]
        ratio = float(np.median(r.batch_prompts_per_s / ref.batch_prompts_per_s))
        rel = float(np.max(np.abs(r.scores - ref.scores)) / np.max(np.abs(ref.scores)))
        print(f"{r.name:<28} {r.prompts_per_s:>10.1f} {r.spread:>6.0%} {ratio:>8.2f}x {rel:>15.1e}")
    gain = float(np.median(results[2].batch_prompts_per_s / results[1].batch_prompts_per_s))
    print(f"onnx + text encoder vs onnx denoiser only, batch by batch: {gain:.3f}x")


if __name__ == "__main__":
    main()
