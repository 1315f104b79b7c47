#!/usr/bin/env bash
# The CUDA checks in one command, for a machine with a GPU, CuPy and nvcc and no network:
# installs this checkout without dependencies, runs the GPU tests, compute-sanitizer's memcheck,
# racecheck (shared-memory hazards on the GPU itself; tests/simt checks the same kernels for
# races under ThreadSanitizer on the host) and synccheck on both fused kernels, and the op
# benchmark. Logs go to ${OUT:-gpu-verify-logs}.
# onnxruntime-gpu is optional: with only the CPU onnxruntime, the SplitSession tests skip and
# the benchmark's ORT columns read n/a (its MatMul column is then CuPy's).
# With TORQ_VERIFY_MODEL=OUT/model.onnx (an export) and onnxruntime-gpu, it also measures the
# split runner against the whole graph on the CUDA EP (tools/bench_split.py --device cuda).
# Run from the repository root: bash tools/gpu_verify.sh [--quick]
set -uo pipefail
out=${OUT:-gpu-verify-logs}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 || { cat "$out/install.log"; exit 1; }
python3 -c "from torq_onnx.runtime_ops import cuda; raise SystemExit(0 if cuda.available() else 'no CUDA GPU visible to CuPy: nothing to verify')" || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$out/device.txt"
python3 -m pytest -q -p no:cacheprovider -m gpu 2>&1 | tee "$out/pytest_gpu.log" || status=1
# A small case for the sanitizers (they slow kernels down by orders of magnitude): both fused
# kernels on 133 rows x 5 blocks (a partial row tile, a partial step, idle warps), per-block R.
case='import cupy as cp, numpy as np
from torq_onnx.runtime_ops import cuda
rng = np.random.default_rng(0)
x = cp.asarray(rng.standard_normal((133, 160)).astype(np.float32))
r = cp.asarray((rng.standard_normal((5, 32, 32)) / np.sqrt(32)).astype(np.float32))
ys = [cuda.block_rotate_quantize(x, r, kernel=k).get() for k in cuda.ROTATE_KERNELS]
assert all(np.array_equal(y, ys[0]) for y in ys), "the fused kernels disagree"
print("sanitizer case ran", sorted(cuda.ROTATE_KERNELS))'
if command -v compute-sanitizer >/dev/null; then
    for tool in memcheck racecheck synccheck; do
        timeout 240 compute-sanitizer --tool "$tool" --error-exitcode 3 python3 -c "$case" >"$out/sanitizer_$tool.log" 2>&1 || status=1
        echo "compute-sanitizer $tool: $(grep -E 'ERROR SUMMARY|sanitizer case|Error' "$out/sanitizer_$tool.log" | tr '\n' ' ')"
    done
else
    echo "compute-sanitizer not found: sanitizer runs skipped" | tee "$out/sanitizer_skipped.txt"
fi
python3 tools/bench_ops.py --cuda-only "$@" 2>&1 | tee "$out/bench_ops.txt" || status=1
if [ -n "${TORQ_VERIFY_MODEL:-}" ]; then
    if python3 -c "import onnxruntime as o; raise SystemExit('CUDAExecutionProvider' not in o.get_available_providers())"; then
        python3 tools/bench_split.py "$TORQ_VERIFY_MODEL" --device cuda 2>&1 | tee "$out/bench_split.txt" || status=1
    else
        echo "onnxruntime has no CUDAExecutionProvider: the split-runner benchmark is skipped" | tee "$out/bench_split.txt"
    fi
fi
exit $status
