"""CuPy as runtime_ops/cuda.py uses it, on the CPU: device arrays are numpy arrays (with CuPy's
``get``), and a launch of a RawModule kernel runs that kernel of mxfp4_quant.cu on the host
emulator of CUDA threads (tests/simt/kernel_harness.cpp) with the grid, block and arguments
cuda.py passes. So the CUDA route's Python side (argument order, grids, row chunks, strides,
the rotated-values output, the mix routes) runs in CI against the same kernels a GPU runs;
what stays GPU-only is the GPU's own execution of them and real device memory."""

from __future__ import annotations

import contextlib
import ctypes
import sys
import time
import types
from pathlib import Path

import numpy as np

from torq_onnx.runtime_ops import cuda

from test_cuda_emulated import run  # a harness run: its float32 outputs, checked for size


class DeviceArray(np.ndarray):
    """A numpy array standing for a CuPy one."""

    def get(self) -> np.ndarray:
        return np.array(self)


def _device(a) -> DeviceArray:
    return np.asarray(a).view(DeviceArray)


class _UnownedMemory:
    """``cupy.cuda.UnownedMemory``: ``size`` bytes at address ``ptr`` that ``owner`` keeps alive."""

    def __init__(self, ptr: int, size: int, owner) -> None:
        self.ptr, self.size, self.owner = ptr, size, owner


class _MemoryPointer:
    """``cupy.cuda.MemoryPointer``: an offset into a memory."""

    def __init__(self, mem: _UnownedMemory, offset: int) -> None:
        self.mem, self.ptr = mem, mem.ptr + offset


def _ndarray(shape, dtype=float, memptr: _MemoryPointer | None = None) -> DeviceArray:
    """``cupy.ndarray`` over ``memptr``'s memory (here host memory): a view, not a copy; a
    shape larger than the memory is refused, as CuPy's bounds would be overrun."""
    if memptr is None:
        return _device(np.empty(shape, dtype))
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if memptr.ptr - memptr.mem.ptr + nbytes > memptr.mem.size:
        raise ValueError(f"{nbytes} bytes from offset {memptr.ptr - memptr.mem.ptr} overrun a memory of {memptr.mem.size}")
    view = np.frombuffer((ctypes.c_char * nbytes).from_address(memptr.ptr), dtype=dtype).reshape(shape).view(DeviceArray)
    view.memory = memptr.mem  # keeps the owner alive while the view lives, as CuPy's does
    return view


class _Devices:
    """CuPy's current device, per module: ``Device(n)`` as a context makes GPU n current;
    ``Device()`` is the current one."""

    def __init__(self, count: int) -> None:
        self.count, self.current = count, 0

    def device(self, n: int | None = None) -> contextlib.AbstractContextManager:
        devices = self
        n = self.current if n is None else int(n)
        if not 0 <= n < self.count:
            raise RuntimeError(f"cudaErrorInvalidDevice: invalid device ordinal {n}")

        class Device(contextlib.AbstractContextManager):
            id = n
            compute_capability = "90"

            def __enter__(self):
                self.previous, devices.current = devices.current, n
                return self

            def __exit__(self, *exc) -> None:
                devices.current = self.previous

            def synchronize(self) -> None:  # its work is done when a launch returns
                pass

        return Device()

    def stream(self, non_blocking: bool = False) -> "_Stream":
        return _Stream(self)


class _Stream(contextlib.AbstractContextManager):
    """``cupy.cuda.Stream``: made on the current device, and entered (made CuPy's current
    stream) only while that device is current: CuPy raises otherwise
    (``check_stream_device_match`` in cupy/cuda/stream.pyx)."""

    def __init__(self, devices: _Devices) -> None:
        self.devices, self.device_id, self.ptr = devices, devices.current, id(self)

    def __enter__(self):
        if self.device_id != self.devices.current:
            raise RuntimeError(f"The device that the stream is created on ({self.device_id}) "
                               f"does not match with the current device ({self.devices.current})")
        return self

    def __exit__(self, *exc) -> None:
        pass

    def synchronize(self) -> None:
        pass


def module(devices: int = 1) -> types.ModuleType:
    """A ``cupy`` module with what cuda.py and the split runner call, with ``devices`` GPUs."""
    cp = types.ModuleType("cupy")
    cp.float32 = np.float32
    cp.nan = np.nan
    cp.asarray = lambda a, dtype=None: _device(np.asarray(a, dtype))
    cp.empty = lambda shape, dtype=None: _device(np.empty(shape, dtype))
    cp.copyto = np.copyto
    cp.ascontiguousarray = lambda a, dtype=None: _device(np.ascontiguousarray(a, dtype))
    cp.empty_like = lambda a: _device(np.empty_like(a))
    cp.full = lambda shape, value, dtype=None: _device(np.full(shape, value, dtype))
    cp.eye = lambda n, dtype=None: _device(np.eye(n, dtype=dtype))
    cp.matmul = lambda a, b: _device(np.matmul(a, b))
    cp.ndarray = _ndarray
    # at least one device, so cuda.available() is True
    gpus = _Devices(devices)
    runtime = types.SimpleNamespace(getDeviceCount=lambda: gpus.count, getDeviceProperties=lambda i: {"name": b"emulated CUDA device"})
    cp.cuda = types.SimpleNamespace(runtime=runtime, Device=gpus.device, Stream=gpus.stream, UnownedMemory=_UnownedMemory,
                                    MemoryPointer=_MemoryPointer)
    return cp


def profiler_module() -> types.ModuleType:
    """``cupyx.profiler`` with its ``benchmark``, timing fn() on the host clock (the emulated
    device has no other), at most one warm-up and two timed calls: an emulated time says
    nothing of a GPU's, so only the code that takes it is exercised."""
    def benchmark(fn, args=(), n_repeat: int = 10000, n_warmup: int = 10):
        for _ in range(min(n_warmup, 1)):
            fn(*args)
        times = []
        for _ in range(min(n_repeat, 2)):
            t = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - t)
        return types.SimpleNamespace(cpu_times=np.array(times), gpu_times=np.array([times]))

    profiler = types.ModuleType("cupyx.profiler")
    profiler.benchmark = benchmark
    return profiler


def install(harness: Path) -> None:
    """For the rest of this process, ``import cupy`` gives the emulated module and cuda.py's
    kernels launch on ``harness``: how ``pytest -m gpu --emulated-cupy`` runs the CuPy route's
    GPU tests on the CPU (tests/conftest.py). ORT's CUDA and TensorRT EPs are taken off the
    providers onnxruntime lists (onnxruntime-gpu lists them without a GPU too), so the tests
    that need one skip: their device memory cannot be the emulator's numpy arrays."""
    import onnxruntime as ort

    sys.modules["cupy"] = module()
    cuda._kernel = kernels(harness)
    host = [p for p in ort.get_available_providers() if p not in ("CUDAExecutionProvider", "TensorrtExecutionProvider")]
    ort.get_available_providers = lambda: list(host)


def kernels(harness: Path, launches: list | None = None):
    """A stand-in for cuda._kernel: ``kernels(harness)(name)`` is a launcher of that kernel,
    called as CuPy's RawKernel is, ``(grid, block, args)``, that runs it on ``harness`` and
    writes its outputs into the given arrays. Each launch is appended to ``launches``."""
    rotate_names = {k.name for k in cuda.ROTATE_KERNELS.values()}

    def kernel(name: str):
        def launch(grid: tuple, block: tuple, args: tuple) -> None:
            gx, gy = (tuple(grid) + (1,))[:2]
            if launches is not None:
                launches.append((name, (gx, gy), tuple(block)))
            if name == "mxfp4_fake_quant":
                z, y, n_blocks, bump = args
                n = int(n_blocks) * 32
                y.reshape(-1)[:n] = run(harness, [name, gx, gy, block[0], int(n_blocks), repr(float(bump))],
                                        z.reshape(-1)[:n].tobytes(), n)
            elif name == cuda.MIX_KERNEL:
                x, r, out, columns, groups, width = args
                n = int(columns) * int(groups)
                got = run(harness, [name, gx, gy, block[0], int(columns) // int(width), int(groups), int(width)],
                          x.reshape(-1)[:n].tobytes() + r.tobytes(), 2 * n)
                out.reshape(-1)[:n] = got[:n]
            elif name in rotate_names:
                x, r, y, z, n_rows, n_blocks, r_stride, bump = args
                n = int(n_rows) * int(n_blocks) * 32
                got = run(harness, [name, gx, gy, block[0], int(n_rows), int(n_blocks), int(r_stride), repr(float(bump))],
                          x.reshape(-1)[:n].tobytes() + r.tobytes(), 2 * n)
                y.reshape(-1)[:n] = got[:n]
                if not isinstance(z, int):  # 0: no rotated-values output (a null pointer)
                    z.reshape(-1)[:n] = got[n:]
            else:
                raise AssertionError(f"the emulated module has no kernel {name!r}")

        return launch

    return kernel
