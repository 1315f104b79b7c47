"""NVRTC, CUDA's runtime compiler, bound with ctypes from the pip package nvidia-cuda-nvrtc, with
the few calls of CuPy's ``cupy.cuda.nvrtc`` that ``runtime_ops.cuda.compile_cubin`` makes. NVRTC
is a host library: it compiles for any architecture without a GPU or a driver, so the tests
build the kernels exactly as a GPU session does."""

from __future__ import annotations

import ctypes
from pathlib import Path

from torq_onnx.runtime_ops.nvidia_wheels import wheel_files


class NVRTCError(RuntimeError):
    pass


def find_library() -> Path | None:
    """libnvrtc.so.* from the nvidia-cuda-nvrtc wheel (nvidia/cu13/lib or nvidia/cuda_nvrtc/lib)."""
    found = [p for p in wheel_files("*/lib/libnvrtc.so*") if "builtins" not in p.name]
    return found[0] if found else None


class Nvrtc:
    """createProgram / compileProgram / getCUBIN / getPTX / getProgramLog / destroyProgram, as CuPy names them."""

    NVRTCError = NVRTCError

    def __init__(self, library: Path):
        self._lib = ctypes.CDLL(str(library))
        self._lib.nvrtcGetErrorString.restype = ctypes.c_char_p

    def _check(self, status: int) -> None:
        if status != 0:
            raise NVRTCError(self._lib.nvrtcGetErrorString(status).decode())

    def createProgram(self, src: str, name: str, headers, include_names) -> ctypes.c_void_p:
        if headers or include_names:
            raise NotImplementedError("in-memory headers are not bound")
        prog = ctypes.c_void_p()
        self._check(self._lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), name.encode(), 0, None, None))
        return prog

    def compileProgram(self, prog: ctypes.c_void_p, options) -> None:
        opts = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
        self._check(self._lib.nvrtcCompileProgram(prog, len(options), opts))

    def _sized(self, prog: ctypes.c_void_p, what: str) -> bytes:
        size = ctypes.c_size_t()
        self._check(getattr(self._lib, f"nvrtcGet{what}Size")(prog, ctypes.byref(size)))
        buf = ctypes.create_string_buffer(size.value)
        self._check(getattr(self._lib, f"nvrtcGet{what}")(prog, buf))
        return buf.raw

    def getCUBIN(self, prog: ctypes.c_void_p) -> bytes:
        return self._sized(prog, "CUBIN")

    def getPTX(self, prog: ctypes.c_void_p) -> bytes:
        return self._sized(prog, "PTX")

    def getProgramLog(self, prog: ctypes.c_void_p) -> str:
        return self._sized(prog, "ProgramLog").rstrip(b"\0").decode()

    def destroyProgram(self, prog: ctypes.c_void_p) -> None:
        self._check(self._lib.nvrtcDestroyProgram(ctypes.byref(prog)))
