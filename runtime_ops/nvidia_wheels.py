"""CUDA's host tools and libraries as NVIDIA's pip wheels install them (nvidia-cuda-nvrtc, -cuobjdump,
-nvdisasm: under ``site-packages/nvidia/<component>/``, on no search path), so
code that runs without a CUDA toolkit can still find them."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path


def wheel_files(pattern: str) -> list[Path]:
    """Files matching ``pattern`` (a glob such as ``"*/lib/libnvrtc.so*"``) under every
    ``nvidia`` namespace-package folder, sorted."""
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec else []
    return sorted(p for root in roots for p in Path(root).glob(pattern))


def cuda_tool(name: str) -> str | None:
    """The CUDA command-line tool ``name`` (e.g. ``cuobjdump``): on the PATH, else from a wheel."""
    return shutil.which(name) or next((str(p) for p in wheel_files(f"*/bin/{name}")), None)


def can_disassemble() -> bool:
    """Whether :func:`cuobjdump` can run here: cuobjdump and nvdisasm are both found."""
    return bool(cuda_tool("cuobjdump") and cuda_tool("nvdisasm"))


def cuobjdump(binary: str | Path, *flags: str) -> str:
    """CUDA's ``cuobjdump`` on ``binary`` (a cubin, or a library with a fat binary) with
    ``flags`` (``"-sass"``, ``"-ptx"``), its output. It runs ``nvdisasm`` for SASS, found
    the same way. A RuntimeError names a missing tool or cuobjdump's failure."""
    tool, nvdisasm = cuda_tool("cuobjdump"), cuda_tool("nvdisasm")
    if not (tool and nvdisasm):
        raise RuntimeError("needs CUDA's cuobjdump and nvdisasm (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    env = {**os.environ, "PATH": f"{Path(nvdisasm).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    res = subprocess.run([tool, *flags, str(binary)], capture_output=True, text=True, env=env, timeout=300)
    if res.returncode:
        raise RuntimeError(f"cuobjdump {' '.join(flags)} {binary} failed:\n{res.stderr}")
    return res.stdout
