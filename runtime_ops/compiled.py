"""The compiled ORT custom-op library: ``TorqRotateQuantize`` as a native kernel in the whole graph.

An exported model carries the op as an ONNX function, which any ONNX Runtime inlines. A
session that also loads this library runs the op as a compiled kernel instead (ORT prefers a
registered kernel to a model-local function of the same name), on CPU and, in a build made
with ``cuda=True``, on the CUDA execution provider: the whole graph in one ORT run per
forward pass, the fused CUDA kernels on ORT's own stream. Source: ``ort_custom_ops.cc`` (C
API only, version 1.20, so a build loads in every newer ORT) and ``ort_custom_ops_cuda.cu``.

The library is built on the machine that uses it, once, into a cache keyed by its sources,
compiler, flags and headers (:func:`build_library`). It needs a C++17 compiler (``$CXX`` or
``g++``; ``nvcc`` for CUDA) and ONNX Runtime's C API headers, which the onnxruntime wheels
do not ship: give the ``include`` folder of an ORT release (``--ort-include DIR`` or
``$TORQ_ORT_INCLUDE``), or let :func:`ort_headers` fetch them once from the npm registry
(:data:`NPM_HEADERS_PACKAGE`, which bundles ORT's unmodified MIT-licensed headers).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from torq_onnx.atomic import check_output_file, replace_dir
from torq_onnx.errors import TorqError

HERE = Path(__file__).parent
CPU_SOURCES = ("ort_custom_ops.cc",)
CUDA_SOURCES = ("ort_custom_ops.cc", "ort_custom_ops_cuda.cu")
HEADERS = ("ort_custom_ops.h", "mxfp4_math.cuh", "mxfp4_quant.cu")  # read by the sources
MIN_ORT_API = 20  # TORQ_ORT_API in ort_custom_ops.cc: onnxruntime 1.20
# ORT's C/C++ headers as an npm package (the ONNX Runtime Unity plugin; its iOS framework
# carries the platform-independent headers of ORT 1.29)
NPM_HEADERS_PACKAGE = "com.github.asus4.onnxruntime@0.4.9"
NPM_HEADERS_DIR = "package/Plugins/iOS~/onnxruntime.xcframework/ios-arm64_x86_64-simulator/onnxruntime.framework/Headers/"
DEFAULT_CUDA_ARCHS = ("sm_80", "sm_90")
COMPILE_TIMEOUT_S = 600


def cache_dir() -> Path:
    """Where built libraries and fetched headers live: ``$TORQ_ONNX_CACHE``, else
    ``$XDG_CACHE_HOME/torq-onnx`` (``~/.cache/torq-onnx``)."""
    if os.environ.get("TORQ_ONNX_CACHE"):
        return Path(os.environ["TORQ_ONNX_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torq-onnx"


def header_api_version(include: Path) -> int:
    """``ORT_API_VERSION`` of the headers in ``include``, or a TorqError saying what is wrong."""
    header = include / "onnxruntime_c_api.h"
    if not header.is_file():
        raise TorqError(f"no onnxruntime_c_api.h in {include} (give the include folder of an ONNX Runtime release)")
    m = re.search(r"#define\s+ORT_API_VERSION\s+(\d+)", header.read_text(errors="replace"))
    if not m:
        raise TorqError(f"{header} defines no ORT_API_VERSION: not ONNX Runtime's C API header")
    version = int(m.group(1))
    if version < MIN_ORT_API:
        raise TorqError(f"{header} is ORT API version {version}; the custom ops need {MIN_ORT_API} (onnxruntime 1.{MIN_ORT_API}) or newer")
    return version


def ort_headers(include: str | Path | None = None, fetch: bool = True) -> Path:
    """A folder with ORT's C API headers: ``include``, else ``$TORQ_ORT_INCLUDE``, else the
    cached copy of :data:`NPM_HEADERS_PACKAGE`, fetched with ``npm`` when ``fetch`` (once)."""
    given = include or os.environ.get("TORQ_ORT_INCLUDE")
    if given:
        path = Path(given).expanduser()
        header_api_version(path)
        return path
    cached = cache_dir() / "ort-include" / NPM_HEADERS_PACKAGE.replace("@", "-")
    if not (cached / "onnxruntime_c_api.h").is_file():
        if not fetch:
            raise TorqError(f"no ONNX Runtime headers: pass --ort-include DIR or set TORQ_ORT_INCLUDE (none cached in {cached})")
        fetch_npm_headers(cached)
    header_api_version(cached)
    return cached


def fetch_npm_headers(dest: Path) -> None:
    """Fetch :data:`NPM_HEADERS_PACKAGE` with ``npm pack`` and keep only its ORT headers in
    ``dest`` (written atomically: a failed fetch leaves nothing)."""
    npm = shutil.which("npm")
    if npm is None:
        raise TorqError("no ONNX Runtime headers: pass --ort-include DIR (an ORT release's include folder), "
                        "set TORQ_ORT_INCLUDE, or install npm so they can be fetched")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        res = subprocess.run([npm, "pack", NPM_HEADERS_PACKAGE, "--pack-destination", tmp, "--silent"],
                             capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        tarballs = list(Path(tmp).glob("*.tgz"))
        if res.returncode != 0 or not tarballs:
            raise TorqError(f"npm could not fetch the ONNX Runtime headers ({NPM_HEADERS_PACKAGE}): {res.stderr.strip()[-500:]}")
        staged = Path(tmp, "include")
        staged.mkdir()
        with tarfile.open(tarballs[0]) as tar:
            for member in tar.getmembers():
                name = member.name
                if member.isfile() and name.startswith(NPM_HEADERS_DIR) and name.endswith(".h") and "/" not in name[len(NPM_HEADERS_DIR):]:
                    with tar.extractfile(member) as src:
                        (staged / Path(name).name).write_bytes(src.read())
        if not (staged / "onnxruntime_c_api.h").is_file():
            raise TorqError(f"{NPM_HEADERS_PACKAGE} no longer holds onnxruntime_c_api.h under {NPM_HEADERS_DIR}")
        replace_dir(staged, dest)


def _cpu_isa_flags() -> list[str]:
    """Vector flags for the fmaf chains on this CPU: with FMA in hardware fmaf is one
    instruction (without it, a correct but slow libm call). The arithmetic does not depend
    on them: every output is the same chain of correctly rounded fmaf's."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return ["-mavx2", "-mfma", "-mf16c"] if {"avx2", "fma", "f16c"} <= flags else []


def _launch_defines(kernel: str | None) -> list[str]:
    """The fused kernel's launch geometry from :data:`cuda.ROTATE_KERNELS` (one source);
    ``kernel`` None is :data:`cuda.DEFAULT_ROTATE_KERNEL`."""
    from torq_onnx.runtime_ops import cuda

    spec = cuda.rotate_kernel(kernel or cuda.DEFAULT_ROTATE_KERNEL)
    return [f"-DTORQ_ROTATE_KERNEL={spec.name}", f"-DTORQ_ROTATE_THREADS={spec.threads}",
            f"-DTORQ_ROTATE_BLOCKS_PER_CTA={spec.blocks_per_cta}", f"-DTORQ_ROTATE_ROWS_PER_CTA={spec.rows_per_cta}",
            f"-DTORQ_MAX_GRID_Y={cuda.MAX_GRID_Y}"]


def compile_command(include: Path, cuda: bool = False, kernel: str | None = None,
                    archs: tuple[str, ...] = DEFAULT_CUDA_ARCHS, strict: bool = False) -> list[str]:
    """The compiler command that builds the library, less its ``-o OUTPUT``. ``strict``:
    warnings are errors (the tests)."""
    common = ["-std=c++17", "-O3", "-shared", f"-I{HERE}", f"-I{include}"]
    # no fast-math: only flags that change no value (FP exceptions and errno are not observed)
    host = ["-fPIC", "-fvisibility=hidden", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno", "-Wall", "-Wextra", "-Wno-unknown-pragmas", *_cpu_isa_flags()]
    if strict:
        host.append("-Werror")
    if not cuda:
        cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
        if cxx is None:
            raise TorqError("no C++ compiler: install g++ or set CXX to build the torq custom ops")
        return [cxx, *common, *host, *(str(HERE / s) for s in CPU_SOURCES)]
    from torq_onnx.runtime_ops import cuda as cuda_ops

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise TorqError("no nvcc on PATH: the CUDA build of the torq custom ops needs the CUDA toolkit")
    gencode = []
    for arch in archs:
        num = arch.removeprefix("sm_")
        gencode += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
    last = archs[-1].removeprefix("sm_")
    gencode += ["-gencode", f"arch=compute_{last},code=compute_{last}"]  # PTX for newer GPUs
    device = ["-DTORQ_ORTOPS_CUDA", *_launch_defines(kernel), *cuda_ops.IEEE_FLAGS, *gencode]  # as NVRTC builds them
    if strict:
        device += ["-Werror", "all-warnings"]
    return [nvcc, *common, *device, "-Xcompiler", ",".join(host), *(str(HERE / s) for s in CUDA_SOURCES)]


def _tool_version(tool: str) -> str:
    try:
        return subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=60).stdout
    except OSError:
        return ""


ARCH_PATTERN = re.compile(r"sm_\d{2,3}[af]?")  # nvcc's real architectures: sm_80, sm_90, sm_90a, sm_100f


def check_build_options(cuda: bool, kernel: str | None, archs: tuple[str, ...] | None) -> None:
    """A TorqError naming the option, before any header fetch or compiler run: a CUDA option
    given without ``cuda`` (a CPU build would ignore it), an unknown kernel, no or a
    malformed architecture (``archs`` None: the default ones)."""
    from torq_onnx.runtime_ops import cuda as cuda_ops

    if not cuda:
        if kernel is not None or archs is not None:
            raise TorqError("--kernel and --arch choose the CUDA build: add --cuda (the CPU build has neither)")
        return
    if kernel is not None:
        cuda_ops.rotate_kernel(kernel)  # a ValueError naming the choices
    if archs is None:
        return
    if not archs:
        raise TorqError("--arch: name at least one GPU architecture (e.g. sm_90)")
    bad = [a for a in archs if not ARCH_PATTERN.fullmatch(a)]
    if bad:
        raise TorqError(f"--arch {bad[0]!r} is not a GPU architecture of the form sm_NN (e.g. sm_80, sm_90, sm_90a)")


def build_library(cuda: bool = False, include: str | Path | None = None, kernel: str | None = None,
                  archs: tuple[str, ...] | None = None, output: str | Path | None = None, strict: bool = False) -> Path:
    """Build the custom-op library (CPU kernel; with ``cuda`` also the CUDA EP kernel, the
    fused ``kernel`` of :data:`cuda.ROTATE_KERNELS` for ``archs``, by default
    :data:`DEFAULT_CUDA_ARCHS`) and return its path.

    Without ``output`` it goes to the cache and is reused while sources, compiler, flags and
    headers stay the same. The file appears whole or not at all (built under a temporary
    name, then renamed); a compiler error is a TorqError with the compiler's message."""
    check_build_options(cuda, kernel, archs)
    inc = ort_headers(include)
    command = compile_command(inc, cuda, kernel, archs or DEFAULT_CUDA_ARCHS, strict)
    if output is None:
        key = hashlib.sha256()
        for name in (*(CUDA_SOURCES if cuda else CPU_SOURCES), *HEADERS):
            key.update((HERE / name).read_bytes())
        key.update("\0".join(command[1:]).encode())
        key.update(_tool_version(command[0]).encode())
        key.update((inc / "onnxruntime_c_api.h").read_bytes())
        target = cache_dir() / "ortops" / f"libtorq_ortops{'_cuda' if cuda else ''}-{key.hexdigest()[:16]}.so"
        if target.is_file():
            return target
    else:
        target = check_output_file(output)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        res = subprocess.run([*command, "-o", str(tmp)], capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        if res.returncode != 0:
            raise TorqError(f"building the torq custom ops failed:\n{(res.stderr or res.stdout).strip()[-4000:]}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def register(sess_options, library: str | Path | None = None, cuda: bool = False):
    """``sess_options`` (made if None) with the custom-op library registered: ``library``, or
    the cached build (:func:`build_library`, built now if needed). Returns the options."""
    import onnxruntime as ort

    opts = sess_options or ort.SessionOptions()
    path = Path(library) if library else build_library(cuda=cuda)
    if not path.is_file():
        raise TorqError(f"no custom-op library at {path}")
    try:
        opts.register_custom_ops_library(str(path))
    except Exception as exc:  # ORT reports a failed dlopen or registration as a plain RuntimeError
        raise TorqError(f"ONNX Runtime could not load the custom-op library {path}: {exc}") from exc
    return opts
