"""The GPU builds of the kernels compute exactly the IEEE operations the host tests check them
by: no flush-to-zero, no approximate functions, only round-to-nearest-even, and no multiply
or add that ptxas could fuse into a multiply-add (cuda.IEEE_FLAGS). Read without a GPU from
the code NVRTC builds for a GPU session (its PTX, and the SASS of its cubin); the ORT
library's nvcc build is read in test_compiled_ops.py. Counter-examples (fast math, and
contraction left on) show what the readers catch."""

from __future__ import annotations

import pytest

from torq_onnx.runtime_ops import cuda
from torq_onnx.runtime_ops.nvidia_wheels import can_disassemble, cuobjdump

import float_code
from nvrtc_ctypes import Nvrtc, find_library
from test_cuda_nvrtc import KERNELS as NVRTC_KERNELS

LIBRARY = find_library()
pytestmark = pytest.mark.skipif(LIBRARY is None, reason="no NVRTC library (pip install nvidia-cuda-nvrtc, in the dev extra)")
needs_cuobjdump = pytest.mark.skipif(not can_disassemble(),
                                     reason="needs cuobjdump and nvdisasm (the dev extra's nvidia-cuda-cuobjdump, -nvdisasm)")
ARCHS = ["75", "80", "90"]
# what the kernels' arithmetic compiles to, so a reader that saw none of it fails
PTX_ARITHMETIC = {"fma.rn.f32", "mul.rn.f32", "cvt.rni.f32.f32", "min.f32", "max.f32"}
SASS_ARITHMETIC = {"FFMA", "FMUL", "FRND", "FMNMX"}


def session_ptx(arch: str) -> str:
    ptx, log = cuda.compile_ptx(f"compute_{arch}", Nvrtc(LIBRARY))
    assert not log.strip(), log
    return ptx.rstrip(b"\0").decode()


def session_sass(arch: str, tmp_path) -> str:
    cubin, _ = cuda.compile_cubin(f"sm_{arch}", Nvrtc(LIBRARY))
    (tmp_path / "k.cubin").write_bytes(cubin)
    return cuobjdump(tmp_path / "k.cubin", "-sass")


@pytest.mark.parametrize("arch", ARCHS)
def test_session_ptx_asks_for_exact_ieee_operations_only(arch):
    ops = float_code.ptx_float_ops(session_ptx(arch))
    assert PTX_ARITHMETIC <= set(ops), sorted(ops)
    assert float_code.problems(ops, float_code.ptx_problem) == {}


@needs_cuobjdump
@pytest.mark.parametrize("arch", ARCHS)
def test_session_machine_code_runs_exact_ieee_operations_only(arch, tmp_path):
    """The SASS ptxas makes of that PTX, kernel by kernel: what the GPU runs. The group-mixing
    kernel's one integer division (a column's token) is lowered to exact code that uses the
    special-function unit's reciprocal, which its PTX shows to be all it is."""
    sass = session_sass(arch, tmp_path)
    ops = float_code.sass_float_ops(sass)
    assert SASS_ARITHMETIC <= set(ops), sorted(ops)
    functions, ptx = dict(float_code.sass_functions(sass)), float_code.ptx_functions(session_ptx(arch))
    assert set(functions) == set(ptx) == set(NVRTC_KERNELS), (sorted(functions), sorted(ptx))
    for name, body in functions.items():
        assert float_code.sass_problems(body, ptx[name]) == {}, name


def test_the_integer_division_allowance_needs_the_ptx_to_show_it():
    """Without an integer division in the PTX, or beside a float one, MUFU.RCP is a finding."""
    sass = "/*0010*/ MUFU.RCP R1, R2 ;\n/*0020*/ I2F.U32.RP R3, R4 ;"
    assert float_code.sass_problems(sass, "div.u64 %rd1, %rd2, %rd3;") == {}
    assert set(float_code.sass_problems(sass, "mul.lo.s64 %rd1, %rd2, %rd3;")) == {"MUFU.RCP", "I2F.U32.RP"}
    assert set(float_code.sass_problems(sass, "rem.s64 %rd1, %rd2, %rd3;\n div.rn.f32 %f1, %f2, %f3;")) == {"MUFU.RCP", "I2F.U32.RP"}


def test_fast_math_is_caught_in_ptx_and_sass(monkeypatch, tmp_path):
    monkeypatch.setattr(cuda, "nvrtc_options", lambda arch: ("--std=c++14", "--use_fast_math", f"-I{cuda._KERNEL_SRC.parent}",
                                                             f"--gpu-architecture={arch}"))
    ptx_problems = float_code.problems(float_code.ptx_float_ops(session_ptx("90")), float_code.ptx_problem)
    assert {"fma.rn.ftz.f32", "mul.ftz.f32"} <= set(ptx_problems), ptx_problems
    if can_disassemble():
        sass_problems = float_code.problems(float_code.sass_float_ops(session_sass("90", tmp_path)), float_code.sass_problem)
        assert {"FFMA.FTZ", "FMUL.FTZ"} <= set(sass_problems), sass_problems


def test_contraction_left_on_is_caught(monkeypatch):
    """--fmad=true (both compilers' default) leaves the quantizer's products as plain mul.f32,
    which ptxas may fuse with a following add: the reader flags them."""
    ieee = cuda.nvrtc_options
    monkeypatch.setattr(cuda, "nvrtc_options", lambda arch: tuple("--fmad=true" if o == "--fmad=false" else o for o in ieee(arch)))
    ptx_problems = float_code.problems(float_code.ptx_float_ops(session_ptx("90")), float_code.ptx_problem)
    assert set(ptx_problems) == {"mul.f32"}, ptx_problems


@pytest.mark.parametrize("op, why", [("div.approx.f32", "approximate"), ("div.full.f32", "approximate"),
                                     ("add.rz.f32", "nearest"), ("sqrt.rn.f32", None), ("cvt.rmi.f32.f32", None),
                                     ("cvt.rn.f16.f32", None), ("add.f16", "fuse"), ("ex2.approx.ftz.f32", "subnormals")])
def test_ptx_reader_on_single_instructions(op, why):
    got = float_code.ptx_problem(op)
    assert (got is None) if why is None else (why in got), got


@pytest.mark.parametrize("op, why", [("MUFU.RCP", "approximate"), ("FADD.RZ", "nearest"), ("F2F.F16.F32.RM", "nearest"),
                                     ("FRND.FLOOR", None), ("FSETP.GEU.AND", None), ("HFMA2.MMA", None)])
def test_sass_reader_on_single_instructions(op, why):
    got = float_code.sass_problem(op)
    assert (got is None) if why is None else (why in got), got
