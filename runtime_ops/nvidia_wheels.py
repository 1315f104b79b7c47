"""CUDA's host tools and libraries as NVIDIA's pip wheels install them (nvidia-cuda-nvrtc, -cuobjdump,
-nvdisasm: under ``site-packages/nvidia/<component>/``, on no search path), so
code that runs without a CUDA toolkit can still find them."""

from __future__ import annotations

import importlib.util
import shutil
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
