#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py says what it runs): under 10 minutes on a GPU, one Markdown table at the end.
#
#   bench/gpu_check.sh                  # Linux with nvidia-smi: mlx[cuda] installed if MLX has no CUDA yet; macOS: Metal
#   bench/gpu_check.sh --cpu            # on the CPU, scaled down (checks the script itself)
#   MLX_WHEELS=/path/to/wheels bench/gpu_check.sh   # a machine without internet: pip installs from that folder
#
# Any other arguments go to bench/gpu_check.py (e.g. --budget 300, --skip tests, --baby_iters 500).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

if [[ " $* " != *" --cpu "* ]]; then
    if [[ "$(uname)" == "Darwin" ]]; then
        "$PYTHON" -c "import mlx.core as mx, sys; sys.exit(0 if mx.metal.is_available() else 1)" \
            || { echo "gpu_check: MLX sees no Metal GPU on this Mac; pass --cpu to check on the CPU" >&2; exit 1; }
    elif command -v nvidia-smi > /dev/null && nvidia-smi > /dev/null 2>&1; then
        has_cuda() { "$PYTHON" -c "import mlx.core as mx, sys; sys.exit(0 if mx.cuda.is_available() else 1)" 2> /dev/null; }
        if ! has_cuda; then
            # the mlx release already installed, with its CUDA build
            version=$("$PYTHON" -c "import importlib.metadata as m; print(m.version('mlx'))" 2> /dev/null || true)
            spec="mlx[cuda]${version:+==$version}"
            echo "gpu_check: installing $spec" >&2
            if [[ -n "${MLX_WHEELS:-}" ]]; then
                "$PYTHON" -m pip install -q --no-index --find-links "$MLX_WHEELS" "$spec"
            else
                "$PYTHON" -m pip install -q "$spec"
            fi
            has_cuda || { echo "gpu_check: MLX still sees no CUDA GPU after installing $spec" >&2; exit 1; }
        fi
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2
    else
        echo "gpu_check: no GPU here (no nvidia-smi, not macOS); pass --cpu to check on the CPU" >&2
        exit 1
    fi
fi
exec "$PYTHON" bench/gpu_check.py "$@"
