"""tools/prune_fatbin.py on a CUDA shared library nvcc builds here: the cubins no kept GPU can
use become zeros in place, and every other byte (the kept cubins, PTX, host code) is unchanged.
The cubins are located independently of the tool's parser: nvcc -cubin builds each one alone,
byte-identical to the copy embedded in the library."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


def located(data: bytes, cubin: bytes) -> slice:
    assert data.count(cubin) == 1, "the standalone cubin should be embedded once"
    start = data.index(cubin)
    return slice(start, start + len(cubin))


@pytest.mark.parametrize("keep,zeroed,kept", [("90", "80", "90"), ("86", "90", "80")])
def test_prune_zeroes_exactly_the_unusable_cubins(built, tmp_path, keep, zeroed, kept):
    """sm_90 keeps the sm_90 cubin and zeroes sm_80's; sm_86 keeps sm_80's (same major, older
    minor: it runs there) and zeroes sm_90's. Everything else is byte-for-byte the same, and the
    library still loads as a shared object."""
    lib = tmp_path / "libk.so"
    shutil.copy(built["lib"], lib)
    before = lib.read_bytes()
    gone, stays = located(before, built[zeroed].read_bytes()), located(before, built[kept].read_bytes())
    listing = prune(lib).stdout
    assert f"sm_{zeroed}:" in listing and f"sm_{kept}:" in listing and "ptx_90:" in listing
    res = prune(lib, "--keep", keep)
    assert res.returncode == 0, res.stderr
    after = lib.read_bytes()
    assert len(after) == len(before)
    assert after[gone] == bytes(gone.stop - gone.start)
    assert after[stays] == before[stays]
    assert after[:gone.start] + after[gone.stop:] == before[:gone.start] + before[gone.stop:]
    assert f"sm_{zeroed}:" not in prune(lib).stdout and "zeros:" in prune(lib).stdout
    ctypes.CDLL(str(lib)).launch  # the host side is intact (no GPU needed to load it)
    again = prune(lib, "--keep", keep)
    assert again.returncode == 0 and lib.read_bytes() == after and "zeroed 0.0 MB" in again.stdout


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
    if content is None:
        shutil.copy(sys.executable, path)  # a real ELF with no device code
    else:
        path.write_bytes(content)
    res = prune(path, "--keep", "90")
    assert res.returncode != 0 and message in res.stderr and "Traceback" not in res.stderr
