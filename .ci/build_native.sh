#!/usr/bin/env bash
# CI step: configure and build the native kernels (Release), then run their ctest suites.
# The CUDA kernels compile wherever nvcc is found and run only where a GPU is (else the
# CUDA test reports "skipped"). pytest then finds build/libmemscan_ops.so by itself.
#   PYTHON  the interpreter whose torch to build against (default: python3 on PATH)
#   BUILD_DIR  where to build (default: build)
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin="$(command -v "${PYTHON:-python3}")"
build_dir="${BUILD_DIR:-build}"

cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE="$python_bin"
cmake --build "$build_dir" --parallel "$(nproc)"
ctest --test-dir "$build_dir" --output-on-failure
