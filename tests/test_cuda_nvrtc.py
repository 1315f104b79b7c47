"""The kernels built by NVRTC with the options a GPU session uses (runtime_ops.cuda.compile_cubin,
C++14, no flush-to-zero), for every architecture we target, on a machine without a GPU: NVRTC
is a host library (pip: nvidia-cuda-nvrtc, in the dev extra). nvcc's compile tests
(test_cuda_compile.py) default to C++17 and another front end, so a construct NVRTC refuses
would otherwise first fail on the GPU, for every kernel in the module."""

from __future__ import annotations

import pytest

from torq_onnx.runtime_ops import cuda

from nvrtc_ctypes import Nvrtc, find_library

LIBRARY = find_library()
pytestmark = pytest.mark.skipif(LIBRARY is None, reason="no NVRTC library (pip install nvidia-cuda-nvrtc, in the dev extra)")
KERNELS = ["mxfp4_fake_quant", *(k.name for k in cuda.ROTATE_KERNELS.values()), cuda.MIX_KERNEL]


@pytest.mark.parametrize("arch", ["sm_75", "sm_80", "sm_90"])
def test_nvrtc_builds_every_kernel_without_a_warning(arch):
    cubin, log = cuda.compile_cubin(arch, Nvrtc(LIBRARY))
    assert not log.strip(), log
    assert cubin[:4] == b"\x7fELF"
    for name in KERNELS:
        assert name.encode() + b"\0" in cubin, f"{name} is not in the {arch} cubin"


def test_a_construct_nvrtc_refuses_fails_with_its_log(tmp_path):
    """C++17's `if constexpr`, which nvcc's default standard accepts, is a compile error under
    the C++14 the kernels are built with; the error carries NVRTC's log."""
    source = cuda._KERNEL_SRC.read_text().replace("    if (blk >= n_blocks) return;",
                                                  "    if constexpr (true) {}\n    if (blk >= n_blocks) return;")
    mutated = tmp_path / "mxfp4_quant.cu"
    mutated.write_text(source)
    with pytest.raises(RuntimeError, match=r"(?s)NVRTC could not compile mxfp4_quant\.cu.*if constexpr"):
        cuda.compile_cubin("sm_90", Nvrtc(LIBRARY), source=mutated)
