"""The fused kernels' machine code, counted without a GPU: what an SM must issue per MX block.

Compiles runtime_ops/mxfp4_quant.cu for an architecture with nvcc (the kernels' GPU build uses
NVRTC with the same IEEE options), disassembles it with CUDA's cuobjdump and nvdisasm (on the
PATH or from the nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm wheels) and prints, per fused kernel (``cuda.ROTATE_KERNELS``),
its registers and shared memory, its SASS instructions, and the warp instructions it issues
per (row, block) of 32 floats: the ``thread`` kernel's straight-line code serves 32 such
blocks per warp, the ``warp`` kernel's main loop 4 (TORQ_W_STEP rows). Those are static
counts (both sides of every branch, so an upper bound on the common path), and from them an
issue-rate ceiling: an SM issues one warp instruction per scheduler per clock, so a kernel
that needs N of them per 256 bytes moved (128 read, 128 written) cannot move more than
SMs x schedulers x clock x 256 / N bytes a second, whatever the memory system gives.

Run: python tools/sass_cost.py [--arch sm_90] [--sms 132] [--clock-ghz 1.98] [--copy-gbps 2828]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from torq_onnx.runtime_ops import cuda
from torq_onnx.runtime_ops.nvidia_wheels import cuda_tool

SRC = Path(cuda.__file__).with_name("mxfp4_quant.cu")
SCHEDULERS = 4  # warp schedulers per SM, each issuing one instruction a clock (sm_70 and newer)
BYTES_PER_BLOCK_ROW = 2 * 32 * 4  # x read and y written; z_out off
ROWS_PER_WARP = {"thread": 32, "warp": 4}  # (row, block)s one pass of the counted code serves


def compile_and_disassemble(arch: str) -> tuple[str, str]:
    """(ptxas's resource report, cuobjdump's SASS) of mxfp4_quant.cu for arch."""
    nvcc, cuobjdump, nvdisasm = cuda_tool("nvcc"), cuda_tool("cuobjdump"), cuda_tool("nvdisasm")
    if not (nvcc and cuobjdump and nvdisasm):
        sys.exit("sass_cost: needs nvcc, cuobjdump and nvdisasm (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp, "k.cubin")
        res = subprocess.run([nvcc, "-cubin", f"-arch={arch}", "-Xptxas", "-v", f"-I{SRC.parent}", "-o", str(cubin), str(SRC)],
                             capture_output=True, text=True)
        if res.returncode:
            sys.exit(f"sass_cost: nvcc failed:\n{res.stderr}")
        env = {**os.environ, "PATH": f"{Path(nvdisasm).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # cuobjdump runs nvdisasm
        sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True, env=env).stdout
    return res.stdout + res.stderr, sass


def resources(report: str, kernel: str) -> tuple[int, int]:
    """(registers, shared-memory bytes) of kernel in ptxas's -v report."""
    m = re.search(rf"entry function '{kernel}'.*?Used (\d+) registers.*?(?:(\d+) bytes smem)?\n", report, re.S)
    return int(m.group(1)), int(m.group(2) or 0)


def instructions(sass: str, kernel: str) -> list[tuple[int, str]]:
    """(address, text) of every instruction of kernel, in order."""
    body = re.search(rf"Function : {kernel}\n(.*?)(?:\n\s+\.+\n|\Z)", sass, re.S).group(1)
    return [(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", body)]


def longest_loop(code: list[tuple[int, str]]) -> list[str]:
    """The instructions from the target of the longest backward branch to that branch."""
    best: list[str] = []
    for addr, text in code:
        m = re.search(r"BRA\b.*?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            body = [t for a, t in code if int(m.group(1), 16) <= a <= addr]
            best = max(best, body, key=len)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--sms", type=int, default=132, help="SMs (H100 SXM and H200: 132)")
    ap.add_argument("--clock-ghz", type=float, default=1.98, help="SM clock (H100/H200 boost: 1.98)")
    ap.add_argument("--copy-gbps", type=float, default=2828.0, help="a measured device-to-device copy, to compare with")
    args = ap.parse_args()
    report, sass = compile_and_disassemble(args.arch)
    issue = args.sms * SCHEDULERS * args.clock_ghz * 1e9  # warp instructions a second
    print(f"{SRC.name} for {args.arch}; issue ceiling for {args.sms} SMs x {SCHEDULERS} schedulers at {args.clock_ghz} GHz, "
          f"against a {args.copy_gbps:.0f} GB/s copy")
    hdr = f"{'kernel':>7} {'regs':>4} {'smem':>5} {'SASS':>5} {'counted':>7} {'FFMA':>5} {'per (row, block)':>16} {'ceiling GB/s':>12} {'% copy':>6}"
    print(hdr + "\n" + "-" * len(hdr))
    for name, spec in sorted(cuda.ROTATE_KERNELS.items()):
        code = instructions(sass, spec.name)
        regs, smem = resources(report, spec.name)
        counted = [t for _, t in code] if name == "thread" else longest_loop(code)
        per_row = len(counted) / ROWS_PER_WARP[name]
        ceiling = issue / per_row * BYTES_PER_BLOCK_ROW / 1e9
        ffma = sum(1 for t in counted if re.match(r"(@!?P\d+\s+)?FFMA\b", t))
        print(f"{name:>7} {regs:>4} {smem:>5} {len(code):>5} {len(counted):>7} {ffma:>5} {per_row:>16.1f} {ceiling:>12.0f} "
              f"{100 * ceiling / args.copy_gbps:>5.0f}%")
    print("counted: the thread kernel's whole code (one (row, block) per lane), the warp kernel's main loop "
          "(4 rows per pass); static counts, both sides of every branch")


if __name__ == "__main__":
    main()
