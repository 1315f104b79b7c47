#!/usr/bin/env bash
# The CUDA checks in one command, for a machine with a GPU, CuPy and nvcc and no network:
# installs this checkout without dependencies, then runs the stages named in
# $TORQ_VERIFY_STAGES (default: all, in this order):
#   tests       pytest -m gpu
#   sanitizers  compute-sanitizer's memcheck, racecheck (shared-memory hazards on the GPU
#               itself; tests/simt checks the same kernels for races under ThreadSanitizer on
#               the host) and synccheck on both fused kernels
#   ops         tools/bench_ops.py --cuda-only (the op against a device copy and its MatMul)
#   profile     Nsight Compute (ncu) on both fused kernels at D=4096, 8k tokens: throughput
#               against the memory and issue limits, occupancy and warp stalls, to tell which
#               bounds each (tools/sass_cost.py predicts the issue limit); where ncu cannot
#               read the counters (a gVisor machine) it says so and the run goes on
#   split       tools/bench_split.py --device cuda on the model (split runner vs whole graph)
#   session     tools/bench_cuda_session.py on the model (CPU, CUDA EP function body, split
#               runner, compiled library on CPU and on the CUDA EP: PPL, KL and top-1 vs CPU,
#               decode tokens/s), then torq-onnx generate --device cuda on it (with and
#               without --custom-ops) and tools/bench_prefill.py --device cuda
#   export      only the exports below (the split and session stages make them when they need them)
# split and session need a model: TORQ_VERIFY_MODEL=OUT/model.onnx (an export), or
# TORQ_VERIFY_EXPORT=DIR to export the default model there first, and for the session stage
# also a float export (quantization off) in DIR-float (needs the packages tools/gpu_carry.sh
# packs).
# onnxruntime-gpu is optional: with only the CPU onnxruntime, the tests that need the CUDA EP
# skip, the benchmarks' ORT columns read n/a and the split and session stages are skipped.
# TORQ_VERIFY_CARRY=DIR (the parts of tools/gpu_carry.sh, copied into DIR over several calls)
# checks the parts against their SHA256SUMS, unpacks them once into ${TORQ_VERIFY_SITE:-/tmp/site}
# and puts that first on PYTHONPATH.
# TORQ_VERIFY_DRY=1 rehearses the calls on a machine without a GPU: the carry's checksums and
# unpacking, the install, the compiled library's CPU build against the carried headers, the
# GPU tests on the kernel emulator (pytest -m gpu --emulated-cupy: those that need ORT's CUDA
# EP skip), the exports and the session stage's CPU rows (the CPU session and the library's
# CPU kernel); of $TORQ_VERIFY_STAGES it runs tests, export and session (default: tests session).
# Run from the repository root: bash tools/gpu_verify.sh [--quick]   (--quick: bench_ops without D=8192)
set -uo pipefail
# Logs go to gpu-verify-logs/, or, on the device (where $OUT is set and at most 8 files come
# back from it), to /tmp/gpu-verify-logs, packed into $OUT/gpu-verify-logs.tgz after every
# stage, so a run stopped at its time limit still returns the stages it finished.
if [ -n "${OUT:-}" ]; then out=/tmp/gpu-verify-logs; pack_to="$OUT/gpu-verify-logs.tgz"; rm -rf "$out"; else out=gpu-verify-logs; pack_to=""; fi
pack() { [ -z "$pack_to" ] || { tar czf "$pack_to.tmp" -C "$out" . && mv "$pack_to.tmp" "$pack_to"; }; }
# the lent device reaches no registry: should its image have npm, fetching ORT's headers (without the
# carry, they come that way) must fail at once, not retry until the build's 600 s timeout
[ -z "${OUT:-}" ] || export npm_config_offline=true
trap pack EXIT
stages=" ${TORQ_VERIFY_STAGES:-tests sanitizers ops profile split session} "
dry=${TORQ_VERIFY_DRY:-}
if [ -n "$dry" ]; then  # without a GPU: the stages that have a CPU form (bench_cuda_session runs its CPU rows only)
    stages=" "
    for s in ${TORQ_VERIFY_STAGES:-tests session}; do case $s in tests | export | session) stages+="$s " ;; esac; done
fi
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0
stage() { [[ "$stages" == *" $1 "* ]]; }
unxz_stream() {  # xz -dc, or Python's lzma where the image has no xz
    if command -v xz >/dev/null; then xz -dc; else
        python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.LZMAFile(sys.stdin.buffer), sys.stdout.buffer, 1 << 20)'
    fi
}
if [ -n "${TORQ_VERIFY_CARRY:-}" ]; then
    site_dir=${TORQ_VERIFY_SITE:-/tmp/site}
    if [ ! -d "$site_dir" ]; then
        [ -f "$TORQ_VERIFY_CARRY/SHA256SUMS" ] || { echo "$TORQ_VERIFY_CARRY/SHA256SUMS missing: carry the last part too"; exit 1; }
        (cd "$TORQ_VERIFY_CARRY" && sha256sum -c --quiet SHA256SUMS) \
            || { echo "carried parts missing or damaged (a machine that went back between calls loses them): carry them again"; exit 1; }
        rm -rf "$site_dir.partial" && mkdir -p "$site_dir.partial"
        cat "$TORQ_VERIFY_CARRY"/chunk.* | unxz_stream | tar xf - -C "$site_dir.partial" && mv "$site_dir.partial" "$site_dir" \
            || { echo "unpacking $TORQ_VERIFY_CARRY failed"; exit 1; }
    fi
    export PYTHONPATH="$site_dir${PYTHONPATH:+:$PYTHONPATH}"
    # the carried ORT headers, for the compiled custom-op library's build (no npm registry here)
    if [ -z "${TORQ_ORT_INCLUDE:-}" ] && [ -d "$site_dir/torq-ort-include" ]; then export TORQ_ORT_INCLUDE="$site_dir/torq-ort-include"; fi
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 || { cat "$out/install.log"; exit 1; }
if [ -n "$dry" ]; then
    echo "dry run: no GPU stage runs" | tee "$out/device.txt"
    python3 -c "from torq_onnx.runtime_ops import compiled; print('compiled library (CPU build):', compiled.build_library())" 2>&1 \
        | tee -a "$out/device.txt" || status=1
else
    python3 -c "from torq_onnx.runtime_ops import cuda; raise SystemExit(0 if cuda.available() else 'no CUDA GPU visible to CuPy: nothing to verify')" || exit 1
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$out/device.txt"
fi
# onnxruntime-gpu loads CUDA's libraries by name: let it find those of the nvidia-* wheels
site=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if [ -d "$site/nvidia" ]; then
    libs=$(find "$site/nvidia" -name 'lib*.so*' -printf '%h\n' | sort -u | paste -sd:)
    export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
has_cuda_ep() { python3 -c "import onnxruntime as o; raise SystemExit('CUDAExecutionProvider' not in o.get_available_providers())"; }
python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" 2>&1 | tee -a "$out/device.txt"
if stage tests; then
    # dry: on the kernel emulator, CuPy stood in for and ORT's CUDA EP taken away (tests/emulated_cupy.py)
    python3 -m pytest -q -p no:cacheprovider -m gpu ${dry:+--emulated-cupy} 2>&1 | tee "$out/pytest_gpu.log" || status=1
fi
pack
if stage sanitizers; then
    # tools/gpu_cases.py's small case: both fused kernels and the group-mixing kernel (the sanitizers
    # slow kernels down by orders of magnitude)
    if command -v compute-sanitizer >/dev/null; then
        for tool in memcheck racecheck synccheck; do
            timeout 240 compute-sanitizer --tool "$tool" --error-exitcode 3 python3 tools/gpu_cases.py sanitizer >"$out/sanitizer_$tool.log" 2>&1 || status=1
            echo "compute-sanitizer $tool: $(grep -E 'ERROR SUMMARY|sanitizer case|Error' "$out/sanitizer_$tool.log" | tr '\n' ' ')"
        done
    else
        echo "compute-sanitizer not found: sanitizer runs skipped" | tee "$out/sanitizer_skipped.txt"
    fi
fi
pack
if stage ops; then
    python3 tools/bench_ops.py --cuda-only "$@" 2>&1 | tee "$out/bench_ops.txt" || status=1
fi
pack
if stage profile; then
    ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    if [ -n "$ncu" ]; then
        for kernel in $(python3 -c "from torq_onnx.runtime_ops import cuda; print(' '.join(s.name for s in cuda.ROTATE_KERNELS.values()))"); do
            # --clock-control none: the clocks as a real run has them (the device notes' advice)
            timeout 240 "$ncu" --clock-control none --kernel-name "$kernel" --launch-skip 1 --launch-count 1 \
                --section SpeedOfLight --section ComputeWorkloadAnalysis --section SchedulerStats --section Occupancy \
                --section WarpStateStats --section MemoryWorkloadAnalysis \
                python3 tools/gpu_cases.py profile >"$out/ncu_$kernel.txt" 2>&1
            echo "ncu $kernel (rc $?): $(grep -E 'Memory Throughput|Compute \(SM\) Throughput|Issue Slots Busy|Achieved Occupancy|DRAM Throughput|ERR|Error' "$out/ncu_$kernel.txt" | tr -s ' ' | tr '\n' ';')"
        done
    else
        echo "ncu not found: profile skipped" | tee "$out/ncu_skipped.txt"
    fi
fi
pack
model=${TORQ_VERIFY_MODEL:-}
float_model=""
if [ -z "$model" ] && [ -n "${TORQ_VERIFY_EXPORT:-}" ] && { stage split || stage session || stage export; }; then
    torq-onnx export -o "$TORQ_VERIFY_EXPORT" --calib-samples 32 >"$out/export.log" 2>&1 && model="$TORQ_VERIFY_EXPORT/model.onnx" \
        || { tail -20 "$out/export.log"; status=1; }
    if stage session || stage export; then  # quantization off: the float model's CUDA logits against its CPU ones too
        torq-onnx export -o "$TORQ_VERIFY_EXPORT-float" --method rtn --weights float --activations float --calib-samples 2 \
            >"$out/export_float.log" 2>&1 && float_model="$TORQ_VERIFY_EXPORT-float/model.onnx" \
            || { tail -20 "$out/export_float.log"; status=1; }
    fi
fi
pack
if [ -n "$model" ]; then
    if has_cuda_ep; then
        if stage split; then
            python3 tools/bench_split.py "$model" --device cuda 2>&1 | tee "$out/bench_split.txt" || status=1
        fi
    else
        echo "onnxruntime has no CUDAExecutionProvider: the split-runner benchmark is skipped" | tee "$out/bench_split.txt"
    fi
    if stage session; then
        for m in $model $float_model; do
            echo "== $m" | tee -a "$out/bench_cuda_session.txt"
            python3 tools/bench_cuda_session.py "$m" --tokenizer-dir "$(dirname "$m")" --max-tokens 2048 2>&1 | tee -a "$out/bench_cuda_session.txt" || status=1
        done
        if [ -z "$dry" ] && has_cuda_ep; then
            # the user's command on the GPU: generation with the cache in GPU memory, function bodies and library
            for ops in "" --custom-ops; do
                # shellcheck disable=SC2086  # $ops: no argument or one
                torq-onnx generate "$(dirname "$model")" "The capital of France is" --max-new-tokens 32 --device cuda $ops \
                    >>"$out/generate_cuda.txt" 2>&1 || status=1
            done
            cat "$out/generate_cuda.txt"
            # generation's prefill with every position's logits against the last position's (what a prefill copies to the host)
            python3 tools/bench_prefill.py "$model" --tokenizer-dir "$(dirname "$model")" --device cuda --tokens 128,512,2048 \
                2>&1 | tee "$out/bench_prefill_cuda.txt" || status=1
        fi
    fi
fi
exit $status  # the EXIT trap packs the logs
