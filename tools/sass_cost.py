"""The fused kernels' machine code, counted without a GPU: what an SM must issue per MX block.

Compiles runtime_ops/mxfp4_quant.cu for an architecture with nvcc and the options of the
kernels' GPU builds (``cuda.IEEE_FLAGS``), disassembles it with CUDA's cuobjdump and nvdisasm
(on the PATH or from the nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm wheels) and prints,
per fused kernel (``cuda.ROTATE_KERNELS``), its registers and shared memory, its SASS
instructions, and the warp instructions it issues per (row, block) of 32 floats: the
``thread`` kernel's straight-line code serves 32 such blocks per warp, the ``warp`` kernel's
main loop 4 (TORQ_W_STEP rows). Those are static counts (both sides of every branch, so an
upper bound on the common path), and from them an issue-rate ceiling: an SM issues one warp
instruction per scheduler per clock, so a kernel that needs N of them per 256 bytes moved
(128 read, 128 written) cannot move more than SMs x schedulers x clock x 256 / N bytes a
second, whatever the memory system gives.

The second table is the group-mixing kernel (R_inter's product, ``torq_group_mix`` in the same
file, which the CuPy route's ``mix="fmaf"`` and the compiled library both run): its longest
loop, the instructions it issues per FFMA there (each FFMA one step h of one sum for one
lane), and from that the ceiling at G groups, where every output float (4 bytes read, 4
written) takes G steps; "FFMA only" is that ceiling for a loop of nothing but FFMA, the FP32
pipes' limit (one warp FFMA per scheduler a clock). ``--mix-source`` counts the kernel in
other sources beside it (an older version, to compare): a file that defines a kernel whose
name contains ``torq_group_mix``; a copy of the library's ort_custom_ops_cuda.cu is built
with the library's defines.

Run: python tools/sass_cost.py [--arch sm_90] [--sms 132] [--clock-ghz 1.98] [--copy-gbps 2828]
                               [--groups 18,48,128,256] [--mix-source FILE ...]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from torq_onnx.runtime_ops import compiled, cuda
from torq_onnx.runtime_ops.nvidia_wheels import cuda_tool, cuobjdump

SRC = Path(cuda.__file__).with_name("mxfp4_quant.cu")
MIX_KERNEL = cuda.MIX_KERNEL  # extern "C" here; older library copies mangle their name around it
BYTES_PER_MIXED = 2 * 4  # one output float written, its input read
SCHEDULERS = 4  # warp schedulers per SM, each issuing one instruction a clock (sm_70 and newer)
BYTES_PER_BLOCK_ROW = 2 * 32 * 4  # x read and y written; z_out off
ROWS_PER_WARP = {"thread": 32, "warp": 4}  # (row, block)s one pass of the counted code serves


@dataclass(frozen=True)
class Resources:
    """One kernel's entry in ptxas's -v report."""

    registers: int
    smem: int  # bytes of static shared memory
    stack: int  # bytes of stack frame
    spill_stores: int
    spill_loads: int


_REPORT = re.compile(r"Function properties for (\w+)\s+(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
                     r"\s+ptxas info\s+: Used (\d+) registers(?:[^\n]*?(\d+) bytes smem)?[^\n]*\n")


def ptxas_resources(report: str) -> dict[str, Resources]:
    """Every kernel's resources in ptxas's -v report, by name."""
    return {name: Resources(int(regs), int(smem or 0), int(stack), int(stores), int(loads))
            for name, stack, stores, loads, regs, smem in _REPORT.findall(report)}


def compile_cubin(arch: str, cubin: Path, source: Path = SRC, library: bool = False) -> str:
    """Compile ``source`` for arch into cubin with nvcc, as the GPU builds compile it (for a
    ``library`` source, ort_custom_ops_cuda.cu or a copy, with the library's defines); ptxas's
    -v report."""
    nvcc = cuda_tool("nvcc")
    if not nvcc:
        raise RuntimeError("no nvcc on PATH")
    defines = ["-DTORQ_ORTOPS_CUDA", *compiled._launch_defines(None)] if library else []
    res = subprocess.run([nvcc, "-cubin", f"-arch={arch}", *cuda.IEEE_FLAGS, *defines, "-Xptxas", "-v", f"-I{SRC.parent}",
                          "-o", str(cubin), str(source)], capture_output=True, text=True, timeout=300)
    if res.returncode:
        raise RuntimeError(f"nvcc failed:\n{res.stderr}")
    return res.stdout + res.stderr


def compile_and_disassemble(arch: str, source: Path = SRC, library: bool = False) -> tuple[dict[str, Resources], str]:
    """(each kernel's resources, cuobjdump's SASS) of ``source`` for arch."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp, "k.cubin")
        try:
            report = compile_cubin(arch, cubin, source, library)
            sass = cuobjdump(cubin, "-sass")
        except RuntimeError as exc:
            sys.exit(f"sass_cost: {exc}")
    return ptxas_resources(report), sass


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


def is_ffma(text: str) -> bool:
    return re.match(r"(@!?P\d+\s+)?FFMA\b", text) is not None


def mix_ceiling_gbps(groups: int, per_ffma: float, issue: float) -> float:
    """Output bandwidth (input read + output written) of a loop issuing ``per_ffma``
    instructions per FFMA at ``issue`` warp instructions a second, each output taking
    ``groups`` FFMA steps per lane."""
    return issue * 32 / (groups * per_ffma) * BYTES_PER_MIXED / 1e9


@dataclass(frozen=True)
class MixCost:
    """The group-mixing kernel's longest loop, counted."""

    resources: Resources
    loop: int  # instructions
    ffma: int

    @property
    def per_ffma(self) -> float:
        return self.loop / self.ffma


def is_library_source(source: Path) -> bool:
    """Whether ``source`` is (a copy of) the library's CUDA file, which builds only with its defines."""
    return "TORQ_ROTATE_KERNEL" in source.read_text()


def mix_cost(arch: str, source: Path = SRC) -> MixCost:
    resources, sass = compile_and_disassemble(arch, source, library=is_library_source(source))
    name = next(n for n in resources if MIX_KERNEL in n)
    loop = longest_loop(instructions(sass, re.escape(name)))
    return MixCost(resources[name], len(loop), sum(map(is_ffma, loop)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--sms", type=int, default=132, help="SMs (H100 SXM and H200: 132)")
    ap.add_argument("--clock-ghz", type=float, default=1.98, help="SM clock (H100/H200 boost: 1.98)")
    ap.add_argument("--copy-gbps", type=float, default=2828.0, help="a measured device-to-device copy, to compare with")
    ap.add_argument("--groups", default="18,48,128,256",
                    help="R_inter sizes G for the group-mixing ceilings (SmolLM2-135M: 18 and 48; D = 4096: 128)")
    ap.add_argument("--mix-source", type=Path, action="append", default=[],
                    help="another source with a torq_group_mix kernel to count beside today's (e.g. an older version)")
    args = ap.parse_args()
    resources, sass = compile_and_disassemble(args.arch)
    issue = args.sms * SCHEDULERS * args.clock_ghz * 1e9  # warp instructions a second
    print(f"{SRC.name} for {args.arch}; issue ceiling for {args.sms} SMs x {SCHEDULERS} schedulers at {args.clock_ghz} GHz, "
          f"against a {args.copy_gbps:.0f} GB/s copy")
    hdr = f"{'kernel':>7} {'regs':>4} {'smem':>5} {'SASS':>5} {'counted':>7} {'FFMA':>5} {'per (row, block)':>16} {'ceiling GB/s':>12} {'% copy':>6}"
    print(hdr + "\n" + "-" * len(hdr))
    for name, spec in sorted(cuda.ROTATE_KERNELS.items()):
        code = instructions(sass, spec.name)
        regs, smem = resources[spec.name].registers, resources[spec.name].smem
        counted = [t for _, t in code] if name == "thread" else longest_loop(code)
        per_row = len(counted) / ROWS_PER_WARP[name]
        ceiling = issue / per_row * BYTES_PER_BLOCK_ROW / 1e9
        ffma = sum(map(is_ffma, counted))
        print(f"{name:>7} {regs:>4} {smem:>5} {len(code):>5} {len(counted):>7} {ffma:>5} {per_row:>16.1f} {ceiling:>12.0f} "
              f"{100 * ceiling / args.copy_gbps:>5.0f}%")
    print("counted: the thread kernel's whole code (one (row, block) per lane), the warp kernel's main loop "
          "(4 rows per pass); static counts, both sides of every branch")
    groups = [int(g) for g in args.groups.split(",")]
    print(f"\ngroup-mixing kernel ({SRC.name}, {MIX_KERNEL}) for {args.arch}: ceiling GB/s (% copy) at G groups")
    hdr = f"{'source':>32} {'regs':>4} {'smem':>5} {'loop':>5} {'FFMA':>5} {'per FFMA':>8}" + "".join(f" {f'G={g}':>13}" for g in groups)
    print(hdr + "\n" + "-" * len(hdr))
    cell = lambda gbps: f" {gbps:>6.0f} ({100 * gbps / args.copy_gbps:>3.0f}%)"  # noqa: E731
    for label, path in [("this tree", SRC), *((p.name, p) for p in args.mix_source)]:
        cost = mix_cost(args.arch, path)
        r = cost.resources
        print(f"{label[-32:]:>32} {r.registers:>4} {r.smem:>5} {cost.loop:>5} {cost.ffma:>5} {cost.per_ffma:>8.2f}"
              + "".join(cell(mix_ceiling_gbps(g, cost.per_ffma, issue)) for g in groups))
    print(f"{'FFMA only':>32} {'':>4} {'':>5} {'':>5} {'':>5} {1.0:>8.2f}" + "".join(cell(mix_ceiling_gbps(g, 1.0, issue)) for g in groups))
    print("loop: the kernel's longest loop (static, both sides of every branch); each FFMA in it is one step of one sum")


if __name__ == "__main__":
    main()
