#!/usr/bin/env bash
# One prepared GPU check for a lent H100/H200, under 8 minutes. Writes markdown and JSON:
#   1. the fused norm kernel: parity, and bandwidth as a share of a measured device copy;
#      the native CUDA op against Triton (when the native library is built);
#   2. the SD 1.5-, SDXL- and SD3-shaped denoisers (real configs, random weights, fp16):
#      first-step throughput per engine over batch sizes 128..1, share of measured bf16 peak
#      (SDXL and SD3: torch and compile only; an ONNX export of 2B+ parameters takes minutes);
#   3. `memscan bench --sd15`: reference-style loop vs scanner vs compile, same prompts;
#   and the GPU-only tests (`-m gpu`).
# Then: copy RESULTS.md's table into bench/RESULTS.md with the card, date and versions.
#
#   bash bench/gpu_check.sh [OUT_DIR]            # default: $OUT, else bench/gpu_results
#   bash bench/gpu_check.sh --dry-run [OUT_DIR]  # CPU, tiny sizes: checks the scripts themselves
set -uo pipefail
cd "$(dirname "$0")/.."
dry=()
if [[ "${1:-}" == "--dry-run" ]]; then dry=(--dry-run); shift; fi
out="${1:-${OUT:-bench/gpu_results}}"
mkdir -p "$out"
here="$PWD"
importable() {  # does `import scanner` (from elsewhere than this folder) find this tree, engines included?
    (cd / && python -c "import os, sys, scanner.benchmark, scanner.engines; sys.exit(not os.path.realpath(scanner.__file__).startswith('$here/'))")
}
if ! importable 2>/dev/null; then
    # This tree is not what `import scanner` finds (not installed, or another checkout is;
    # a lent machine has no network to pip install): a shadow package that maps
    # scanner.engines and scanner.kernels onto their folders, as pyproject.toml does.
    shadow="$(mktemp -d)"
    mkdir "$shadow/scanner"
    for entry in scanner/*; do ln -s "$PWD/$entry" "$shadow/scanner/"; done
    ln -s "$PWD/engines" "$shadow/scanner/engines"
    ln -s "$PWD/kernels" "$shadow/scanner/kernels"
    export PYTHONPATH="$shadow${PYTHONPATH:+:$PYTHONPATH}"
    importable || { echo "cannot import this tree's scanner (see above)"; exit 2; }
fi
status=0
run() {  # run NAME SECONDS CMD...: time-boxed, logged, a failure recorded but not fatal
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$out/$name.log"
    if [[ $rc -ne 0 ]]; then echo "!! $name exited $rc"; status=1; fi
}
{
    echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    python - <<'PY'
import importlib, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")
for name in ("triton", "diffusers", "onnxruntime", "tensorrt"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except ImportError:
        print(f"{name} not installed")
PY
} > "$out/environment.txt" 2>&1
cat "$out/environment.txt"

run kernel_bandwidth 60 python bench/gpu_kernel_bandwidth.py "${dry[@]}" --out "$out"
if [[ ${#dry[@]} -eq 0 ]]; then
    run native_vs_triton 60 python bench/gpu_native_vs_triton.py
    # The GPU-only tests: the native op, and a scan's batches submitted without a sync (pinned ids, async norms).
    run gpu_tests 90 python -m pytest -q -n 0 -m gpu -p no:cacheprovider tests/test_native_ops.py tests/test_pipelined_scoring.py
fi
run denoiser_sd15 200 python bench/gpu_unet.py "${dry[@]}" --shape sd15 --budget 45 --out "$out"
run denoiser_sdxl 75 python bench/gpu_unet.py "${dry[@]}" --shape sdxl --engines torch,compile --budget 30 --out "$out"
run denoiser_sd3 75 python bench/gpu_unet.py "${dry[@]}" --shape sd3 --engines torch,compile --budget 30 --out "$out"
if [[ ${#dry[@]} -eq 0 ]]; then  # an 860M-parameter UNet is too slow on CPUs for a dry run
    run bench_sd15 150 python bench/throughput.py --sd15 --device cuda --dtype fp16 --prompts 256 --batch-size 64 \
        --engines compile --json "$out/bench_sd15.json"
fi
{
    echo "## GPU check"
    echo '```'; cat "$out/environment.txt"; echo '```'
    cat "$out/kernel_bandwidth.md" "$out"/denoiser_sd15.md "$out"/denoiser_sdxl.md "$out"/denoiser_sd3.md 2>/dev/null
    echo; echo "### memscan bench --sd15"; echo '```'; cat "$out/bench_sd15.log" 2>/dev/null; echo '```'
} > "$out/RESULTS.md"
echo "wrote $out/RESULTS.md"
exit $status
