"""The CUDA sources compile (sm_75, sm_80, sm_90), the fused kernels keep their arrays in registers
and load 16 bytes a lane, and their per-block arithmetic, built for the host with nvcc, is
bit-exact to the numpy MXFP4 reference. Needs nvcc, not a GPU."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from torq_onnx import mxfp4
from torq_onnx.runtime_ops import cuda
from torq_onnx.runtime_ops import functions as F
from torq_onnx.runtime_ops.nvidia_wheels import can_disassemble

from test_runtime_ops import adversarial

SRC = Path(F.__file__).parent
TOOLS = Path(__file__).resolve().parents[1] / "tools"
_spec = importlib.util.spec_from_file_location("sass_cost", TOOLS / "sass_cost.py")
sass_cost = sys.modules["sass_cost"] = importlib.util.module_from_spec(_spec)  # its ptxas-report parser
_spec.loader.exec_module(sass_cost)
NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="no CUDA compiler (nvcc) on PATH")


def nvcc(*args: str) -> None:
    """Run nvcc with every warning an error; fail the test with its output otherwise."""
    res = subprocess.run([NVCC, "-Werror", "all-warnings", f"-I{SRC}", *args], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and not res.stderr.strip(), f"nvcc {' '.join(args)}:\n{res.stdout}\n{res.stderr}"


@pytest.mark.parametrize("arch", ["sm_75", "sm_80", "sm_90"])  # sm_75: T4s, and the pre-sm_80 warp max
# ort_custom_ops_cuda.cu builds only as part of the custom-op library, with the launch geometry
# and ORT headers the build passes (test_compiled_ops.py compiles it, warnings as errors)
@pytest.mark.parametrize("source", sorted(p.name for p in SRC.glob("*.cu") if p.name != "ort_custom_ops_cuda.cu"))
def test_cuda_sources_compile_without_warnings(tmp_path, source, arch):
    nvcc("-cubin", f"-arch={arch}", "-o", str(tmp_path / "out.cubin"), str(SRC / source))
    assert (tmp_path / "out.cubin").stat().st_size > 0


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_fused_kernels_stay_in_registers_and_load_16_bytes_a_lane(tmp_path, arch):
    """What the fused kernels' bandwidth rests on, checked without a GPU in the GPU builds' own
    flags (cuda.IEEE_FLAGS): the 32-element arrays a thread keeps (inputs, outputs, a column
    of R_b) stay in registers (no stack frame, no spills, no local memory), and x is read with
    16-byte vector loads."""
    report = sass_cost.ptxas_resources(sass_cost.compile_cubin(arch, tmp_path / "k.cubin"))
    ptx = subprocess.run([NVCC, "-ptx", f"-arch={arch}", *cuda.IEEE_FLAGS, f"-I{SRC}", "-o", "-", str(SRC / "mxfp4_quant.cu")],
                         capture_output=True, text=True, timeout=300).stdout
    bodies = dict(re.findall(r"\.entry (\w+)\((.*?)\n}", ptx, flags=re.S))
    for kernel in ("torq_block_rotate_quant", "torq_block_rotate_quant_warp"):
        r = report[kernel]
        assert (r.stack, r.spill_stores, r.spill_loads) == (0, 0, 0), (kernel, r)
        assert ".local" not in bodies[kernel]
        assert "ld.global.nc.v4.f32" in bodies[kernel]


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("library", [False, True], ids=["mxfp4_quant.cu", "ort_custom_ops_cuda.cu"])
def test_group_mix_kernel_keeps_its_sums_in_registers(tmp_path, arch, library):
    """The group-mixing kernel, built as the CuPy route builds it and as the library does
    (with its defines): its TORQ_MIX_ROWS sums and staging pointers stay in registers (no
    stack frame, no spills) and its tiles are in shared memory."""
    source = SRC / ("ort_custom_ops_cuda.cu" if library else "mxfp4_quant.cu")
    report = sass_cost.ptxas_resources(sass_cost.compile_cubin(arch, tmp_path / "k.cubin", source, library=library))
    [r] = [r for name, r in report.items() if sass_cost.MIX_KERNEL in name]
    assert (r.stack, r.spill_stores, r.spill_loads) == (0, 0, 0) and r.smem > 0, r


@pytest.mark.skipif(not can_disassemble(),
                    reason="needs cuobjdump and nvdisasm (the dev extra's nvidia-cuda-cuobjdump, -nvdisasm)")
def test_sass_cost_counts_the_matvec_once_and_the_loops_stay_lean():
    """tools/sass_cost.py on the sm_90 machine code: both fused kernels issue exactly 32 FFMA
    per (row, block) and lane (the 32 x 32 matvec, once), which checks the tool's normalization;
    the warp kernel's loop stays under 100 warp instructions per (row, block), the budget
    its issue-rate ceiling above an H100's copy bandwidth rests on (quantizing the step's rows
    one after another, each lane one element, costs 186); and the library's group-mixing
    kernel keeps its register tiles (its loop's instructions per FFMA)."""
    res = subprocess.run([sys.executable, str(TOOLS / "sass_cost.py")], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    rows = {m[0]: m[1:] for m in re.findall(r"^\s*(thread|warp)\s+\d+\s+\d+\s+\d+\s+(\d+)\s+(\d+)\s+([\d.]+)", res.stdout, re.M)}
    assert set(rows) == {"thread", "warp"}, res.stdout
    for kernel, (counted, ffma, per_row) in rows.items():
        assert float(per_row) == pytest.approx(int(counted) / sass_cost.ROWS_PER_WARP[kernel], abs=0.05)  # printed to 0.1
        assert int(ffma) / sass_cost.ROWS_PER_WARP[kernel] == 32, (kernel, res.stdout)
    assert float(rows["warp"][2]) < 100, res.stdout
    # the group-mixing kernel's tile loop: under 2.5 instructions per FFMA (one output per
    # thread, reading x and R from global memory at every step, costs 7.75)
    [(ffma, per_ffma)] = re.findall(r"^\s*this tree\s+\d+\s+\d+\s+\d+\s+(\d+)\s+([\d.]+)", res.stdout, re.M)
    assert int(ffma) > 0 and float(per_ffma) < 2.5, res.stdout


@pytest.fixture(scope="module", params=["host form", "device form"])
def harness(request, tmp_path_factory) -> Path:
    """The host harness with mxfp4_math.cuh's host form (what the compiled CPU op runs) or
    its device form (what GPU code compiles: TORQ_DEVICE_MATH)."""
    exe = tmp_path_factory.mktemp("cuda") / "mxfp4_host_harness"
    nvcc(*(["-DTORQ_DEVICE_MATH"] if request.param == "device form" else []), "-Xcompiler", "-ffp-contract=off",  # as every host build
         "-o", str(exe), str(SRC / "mxfp4_host_harness.cu"))
    return exe


@pytest.mark.parametrize("rule", mxfp4.SCALE_RULES)
def test_kernel_arithmetic_on_the_host_is_bit_exact(harness, rule):
    """Exact powers of two, ties, zero blocks, ±6 saturation, subnormals, near-FLT_MAX,
    NaN/Inf blocks and random magnitudes over the whole float32 range."""
    z = adversarial(np.random.default_rng(21), 600, 96)
    out = subprocess.run([str(harness), repr(F.bump_threshold(rule))], input=z.tobytes(), capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    got = np.frombuffer(out.stdout, dtype=np.float32).reshape(z.shape)
    want = mxfp4.fake_quantize(z, scale_rule=rule)
    assert ((got == want) | (np.isnan(got) & np.isnan(want))).all()
    assert np.isnan(got[6, :32]).all() and (got[0] == 0).all()  # a NaN block, a zero block
