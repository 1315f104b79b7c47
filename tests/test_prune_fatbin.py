"""tools/prune_fatbin.py on a CUDA shared library nvcc builds here: the cubins no kept GPU can
use leave their fat binary, the kept ones (and the PTX) stay byte-for-byte, and no byte
outside the fat-binary section changes. The cubins are located independently of the tool's
parser (nvcc -cubin builds each one alone, byte-identical to the copy embedded in the
library), and where CUDA's cuobjdump is installed (the dev extra's nvidia-cuda-cuobjdump)
NVIDIA's own reader lists and extracts the pruned library's images."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from torq_onnx.runtime_ops.nvidia_wheels import cuda_tool

TOOL = Path(__file__).resolve().parents[1] / "tools" / "prune_fatbin.py"
KERNEL = """extern "C" __global__ void add_one(float* x, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += 1.0f;
}
extern "C" void launch(float* x, int n) { add_one<<<(n + 255) / 256, 256>>>(x, n); }
"""

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (CUDA's compiler)")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("fatbin")
    src = d / "k.cu"
    src.write_text(KERNEL)
    obj, lib = d / "k.o", d / "libk.so"
    archs = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=[sm_90,compute_90]"]
    subprocess.run(["nvcc", *archs, "-c", "-Xcompiler", "-fPIC", "-o", str(obj), str(src)], check=True)
    # -nodlink: no device-link step, whose own small fat binary would hold more sm_80 code
    subprocess.run(["nvcc", "-shared", "-nodlink", "-o", str(lib), str(obj)], check=True)
    out = {"lib": lib}
    for sm in ("80", "90"):
        out[sm] = d / f"k{sm}.cubin"
        subprocess.run(["nvcc", "-cubin", f"-arch=sm_{sm}", "-o", str(out[sm]), str(src)], check=True)
    return out


def prune(lib: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), str(lib), *args], capture_output=True, text=True)


def fatbin_section(lib: Path) -> slice:
    """.nv_fatbin's file range, as binutils' readelf reports it."""
    out = subprocess.run(["readelf", "-S", "-W", str(lib)], capture_output=True, text=True, check=True).stdout
    offset, size = re.search(r"\.nv_fatbin\s+\S+\s+[0-9a-f]+\s+([0-9a-f]+)\s+([0-9a-f]+)", out).groups()
    return slice(int(offset, 16), int(offset, 16) + int(size, 16))


@pytest.mark.parametrize("keep,dropped,kept", [("90", "80", "90"), ("86", "90", "80")])
def test_prune_drops_exactly_the_unusable_cubins(built, tmp_path, keep, dropped, kept):
    """sm_90 keeps the sm_90 cubin and drops sm_80's; sm_86 keeps sm_80's (same major, older
    minor: it runs there) and drops sm_90's. The PTX stays; nothing outside the fat-binary
    section changes; the library still loads as a shared object; a second run changes nothing."""
    lib = tmp_path / "libk.so"
    shutil.copy(built["lib"], lib)
    before = lib.read_bytes()
    gone, stays = built[dropped].read_bytes(), built[kept].read_bytes()
    assert before.count(gone) == 1 and before.count(stays) == 1
    listing = prune(lib).stdout
    assert f"sm_{dropped}:" in listing and f"sm_{kept}:" in listing and "ptx_90:" in listing
    res = prune(lib, "--keep", keep)
    assert res.returncode == 0, res.stderr
    after = lib.read_bytes()
    sec = fatbin_section(lib)
    assert len(after) == len(before) and after[:sec.start] + after[sec.stop:] == before[:sec.start] + before[sec.stop:]
    assert after.count(gone) == 0 and after.count(stays) == 1
    listing = prune(lib).stdout
    assert f"sm_{dropped}:" not in listing and f"sm_{kept}:" in listing and "ptx_90:" in listing
    ctypes.CDLL(str(lib)).launch  # the host side is intact (no GPU needed to load it)
    again = prune(lib, "--keep", keep)
    assert again.returncode == 0 and lib.read_bytes() == after and "dropped 0.0 MB" in again.stdout


@pytest.mark.skipif(cuda_tool("cuobjdump") is None, reason="needs CUDA's cuobjdump (pip install nvidia-cuda-cuobjdump)")
def test_cuobjdump_reads_the_pruned_library(built, tmp_path):
    """NVIDIA's own reader of fat binaries lists the pruned library's images (sm_90 and the
    PTX, no sm_80) and extracts its sm_90 cubin byte-identical to nvcc's standalone one."""
    lib = tmp_path / "libk.so"
    shutil.copy(built["lib"], lib)
    assert prune(lib, "--keep", "90").returncode == 0
    tool = cuda_tool("cuobjdump")
    elves = subprocess.run([tool, "--list-elf", str(lib)], capture_output=True, text=True, check=True).stdout
    ptx = subprocess.run([tool, "--list-ptx", str(lib)], capture_output=True, text=True, check=True).stdout
    assert re.findall(r"\.(sm_\d+)\.cubin", elves) == ["sm_90"] and re.findall(r"\.(sm_\d+)\.ptx", ptx) == ["sm_90"]
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run([tool, "-xelf", "all", str(lib)], cwd=out, capture_output=True, check=True)
    (cubin,) = out.glob("*.cubin")
    assert cubin.read_bytes() == built["90"].read_bytes()


def test_prune_refuses_an_architecture_the_library_lacks(built, tmp_path):
    """No image runs on sm_75 (the PTX is for compute_90): an error naming the architectures
    the library has, and the file untouched."""
    lib = tmp_path / "libk.so"
    shutil.copy(built["lib"], lib)
    res = prune(lib, "--keep", "75")
    assert res.returncode != 0 and "sm_75" in res.stderr and "[80, 90]" in res.stderr and "Traceback" not in res.stderr
    assert lib.read_bytes() == built["lib"].read_bytes()


@pytest.mark.parametrize("content,message", [(b"not an ELF", "not a little-endian ELF64 file"), (None, "no .nv_fatbin section")])
def test_prune_rejects_files_without_cuda_code(tmp_path, content, message):
    path = tmp_path / "lib.so"
    if content is None:  # a real shared library with no device code
        (tmp_path / "none.cpp").write_text("extern \"C\" int none() { return 0; }\n")
        cxx = shutil.which("g++") or shutil.which("c++")
        if cxx is None:
            pytest.skip("needs a host C++ compiler")
        subprocess.run([cxx, "-shared", "-fPIC", "-o", str(path), str(tmp_path / "none.cpp")], check=True)
    else:
        path.write_bytes(content)
    res = prune(path, "--keep", "90")
    assert res.returncode != 0 and message in res.stderr and "Traceback" not in res.stderr
