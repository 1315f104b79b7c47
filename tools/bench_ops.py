"""Benchmark the online op TorqRotateQuantize beside the MatMul it feeds.

CPU table: numpy reference vs the op's ONNX function in ORT CPU vs the compiled custom op
(``runtime_ops/compiled.py``) in ORT CPU. CUDA table (with CuPy and a GPU): each fused CuPy
kernel (``cuda.ROTATE_KERNELS``: a thread or a warp per MX block) vs the same ONNX function
run by ORT's CUDA execution provider and vs the compiled library's CUDA op in an ORT CUDA
session (both need onnxruntime-gpu), its bandwidth against a device-to-device copy, and its time
against the [tokens, D] x [D, D] MatMul it feeds. Two layouts, as exported: "wush"
(per-block 32x32 transforms, identity R_inter as [[1]]) and "torq" (dense R_inter, one
shared 32x32 R_intra); the CPU table adds "eye", wush with R_inter as eye(B), to show what
the [[1]] form saves. The CUDA "torq" rows come once per way of mixing the dense R_inter
(``cuda.MIX_ROUTES``: cuBLAS's batched GEMM, or the library's fmaf group-mixing kernel),
with the mixing's own time beside the whole op's.

Run: python tools/bench_ops.py [--quick] [--cpu-only] [--cuda-only]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from torq_onnx import torq
from torq_onnx.runtime_ops import functions as F
from torq_onnx.runtime_ops import reference as ref

# CuPy reads CUPY_TF32 once, at import, for every float32 matmul it makes: the "cublas" mixing
# route's GEMM as well as the CuPy MatMul baseline used without onnxruntime-gpu. The tool leaves
# it as the environment sets it (CuPy's default: off, full float32) and prints it.
CUPY_TF32 = os.environ.get("CUPY_TF32", "0") == "1"


def best_time(fn, repeat: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def op_model(d: int, per_block: bool) -> onnx.ModelProto:
    b = d // 32
    graph = helper.make_graph(
        [F.make_rotate_quantize_node("x", "ri", "rk", "y")], "bench",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", d]), helper.make_tensor_value_info("ri", TensorProto.FLOAT, ["g", "g"]),
         helper.make_tensor_value_info("rk", TensorProto.FLOAT, [b, 32, 32] if per_block else [32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", d])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", F.STD_OPSET)], ir_version=F.IR_VERSION)
    F.attach_functions(model)
    return model


def matmul_model(d: int) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", d]), helper.make_tensor_value_info("w", TensorProto.FLOAT, [d, d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", d])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=F.IR_VERSION)


def session(model: onnx.ModelProto, provider: str, library=None) -> ort.InferenceSession:
    """A session for ``model``; with ``library`` (a built custom-op library) the op runs compiled."""
    from torq_onnx.runtime_ops import compiled

    opts = compiled.register(None, library) if library else None
    return ort.InferenceSession(model.SerializeToString(), opts, providers=[provider])


def compiled_library(cuda: bool = False):
    """The custom-op library (built and cached on first use), or None with the reason printed."""
    from torq_onnx.errors import TorqError
    from torq_onnx.runtime_ops import compiled

    try:
        return compiled.build_library(cuda=cuda)
    except TorqError as exc:
        print(f"(compiled op unavailable: {exc})")
        return None


def layout(d: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(r_inter, r_intra) of the kind a method exports."""
    b = d // 32
    if name in ("wush", "eye"):  # "eye": wush's transforms with R_inter written as eye(B)
        r_intra = np.random.default_rng(2).standard_normal((b, 32, 32)) / np.sqrt(32)
        eye = np.eye(b, dtype=np.float32)
        return (F.op_r_inter(eye) if name == "wush" else eye), r_intra.astype(np.float32)
    rot = torq.solve_rotation("quarot", d, seed=0)
    return rot.r_inter.astype(np.float32), rot.r_intra.astype(np.float32)


def cpu_table(dims: list[int], tokens: list[int]) -> None:
    print("CPU: TorqRotateQuantize vs the MatMul it feeds, ORT CPU, best of 3 (fn: the op's ONNX function; lib: compiled)")
    lib = compiled_library()
    hdr = (f"{'D':>5} {'tokens':>6} {'layout':>6} {'numpy ref ms':>12} {'ORT fn ms':>9} {'ORT lib ms':>10} {'ORT MatMul ms':>13} "
           f"{'fn/MatMul':>9} {'lib/MatMul':>10}")
    print(hdr + "\n" + "-" * len(hdr))
    for d in dims:
        mm = session(matmul_model(d), "CPUExecutionProvider")
        w = np.random.default_rng(1).standard_normal((d, d)).astype(np.float32)
        for t in tokens:
            x = np.random.default_rng(0).standard_normal((t, d)).astype(np.float32)
            t_mm = best_time(lambda: mm.run(None, {"x": x, "w": w}))
            for name in ("wush", "eye", "torq"):
                ri, rk = layout(d, name)
                model, feeds = op_model(d, name != "torq"), {"x": x, "ri": ri, "rk": rk}
                sess = session(model, "CPUExecutionProvider")
                t_ref = best_time(lambda: ref.rotate_quantize(x, ri, rk), repeat=1)
                t_ort = best_time(lambda: sess.run(None, feeds))
                t_lib = float("nan")
                if lib:
                    sess_lib = session(model, "CPUExecutionProvider", lib)
                    t_lib = best_time(lambda: sess_lib.run(None, feeds))
                print(f"{d:>5} {t:>6} {name:>6} {t_ref * 1e3:>12.1f} {t_ort * 1e3:>9.1f} {t_lib * 1e3:>10.1f} {t_mm * 1e3:>13.1f} "
                      f"{t_ort / t_mm:>9.2f} {t_lib / t_mm:>10.2f}")


def gpu_ms(fn, repeat: int = 50) -> float:
    """Median device time of fn() (CuPy work on the current stream), in ms."""
    from cupyx.profiler import benchmark

    return float(np.median(benchmark(fn, n_repeat=repeat, n_warmup=5).gpu_times[0]) * 1e3)


def ort_cuda_ms(sess: ort.InferenceSession, feeds: dict, out: str, repeat: int = 30) -> float:
    """Median wall time of an ORT CUDA run on device-resident inputs and outputs, in ms."""
    binding = sess.io_binding()
    for k, v in feeds.items():
        binding.bind_ortvalue_input(k, ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0))
    binding.bind_output(out, "cuda", 0)
    sess.run_with_iobinding(binding)  # warm-up (allocations, cuBLAS handles)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        sess.run_with_iobinding(binding)  # returns once the device work is done
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def cuda_table(dims: list[int], tokens: list[int]) -> None:
    from torq_onnx.runtime_ops import cuda

    if not cuda.available():
        print("CUDA: no GPU with CuPy here; table skipped")
        return
    import cupy as cp

    has_ort = "CUDAExecutionProvider" in ort.get_available_providers()
    lib = compiled_library(cuda=True) if has_ort else None
    props = cp.cuda.runtime.getDeviceProperties(0)
    baseline = "ORT CUDA (TF32, the EP's default)" if has_ort else f"CuPy ({'TF32' if CUPY_TF32 else 'no TF32'}: CUPY_TF32)"
    print(f"\nCUDA ({props['name'].decode()}): fused kernel vs ORT CUDA running the op's ONNX function; "
          f"GB/s counts x read + y written; mix: how a dense R_inter is applied (cublas GEMM "
          f"{'in TF32' if CUPY_TF32 else 'in float32'}: CUPY_TF32) and its own ms; MatMul = {baseline} [tokens, D] x [D, D] float32")
    hdr = (f"{'D':>5} {'tokens':>6} {'layout':>6} {'kernel':>6} {'mix':>6} {'mix ms':>6} {'ours ms':>8} {'GB/s':>6} {'% copy':>6} "
           f"{'ORT fn ms':>9} {'ORT lib ms':>10} {'speed-up':>8} {'MatMul ms':>9} {'op/MatMul':>9} {'floor':>6}")
    print(hdr + "\n" + "-" * len(hdr))
    for d in dims:
        w = np.random.default_rng(1).standard_normal((d, d)).astype(np.float32)
        mm = session(matmul_model(d), "CUDAExecutionProvider") if has_ort else None
        wd = None if mm else cp.asarray(w)  # CuPy's MatMul instead
        for t in tokens:
            x = np.random.default_rng(0).standard_normal((t, d)).astype(np.float32)
            xd, out = cp.asarray(x), cp.empty((t, d), cp.float32)
            copy_gbps = 2 * x.nbytes / gpu_ms(lambda: cp.copyto(out, xd)) / 1e6
            t_mm = ort_cuda_ms(mm, {"x": x, "w": w}, "y") if mm else gpu_ms(lambda: cp.matmul(xd, wd))
            floor = 100 * (2 * x.nbytes / copy_gbps / 1e6) / t_mm  # op/MatMul if the op ran at copy bandwidth
            for name in ("wush", "torq"):
                ri, rk = layout(d, name)
                model, feeds = op_model(d, name == "wush"), {"x": x, "ri": ri, "rk": rk}
                t_fn = ort_cuda_ms(session(model, "CUDAExecutionProvider"), feeds, "y") if has_ort else float("nan")
                # the compiled op in a whole-graph ORT CUDA session (its default kernel, cuda.DEFAULT_ROTATE_KERNEL)
                t_lib = ort_cuda_ms(session(model, "CUDAExecutionProvider", lib), feeds, "y") if lib else float("nan")
                for kernel in cuda.ROTATE_KERNELS:
                    for mix in (cuda.MIX_ROUTES if name == "torq" else (None,)):  # wush: no R_inter to mix
                        q = cuda.RotateQuantizer(ri, rk, kernel=kernel, mix=mix or cuda.DEFAULT_MIX_ROUTE)
                        t_mix = gpu_ms(lambda: q.mixed(xd)) if mix else float("nan")
                        t_ours = gpu_ms(lambda: q(xd))
                        gbps = 2 * x.nbytes / t_ours / 1e6
                        print(f"{d:>5} {t:>6} {name:>6} {kernel:>6} {mix or '-':>6} {t_mix:>6.3f} {t_ours:>8.3f} {gbps:>6.0f} "
                              f"{100 * gbps / copy_gbps:>5.0f}% {t_fn:>9.3f} {t_lib:>10.3f} {t_fn / t_ours:>7.1f}x {t_mm:>9.3f} "
                              f"{100 * t_ours / t_mm:>8.1f}% {floor:>5.1f}%")
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s (last size); floor: op/MatMul for an op at copy bandwidth; "
          f"ORT CUDA EP {'available' if has_ort else 'not installed: ORT columns n/a'}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="D in {2048, 4096} only, and 1k tokens only on the CPU")
    ap.add_argument("--cpu-only", action="store_true")
    ap.add_argument("--cuda-only", action="store_true")
    args = ap.parse_args()
    dims = [2048, 4096] if args.quick else [2048, 4096, 8192]
    tokens = [1024, 8192]  # the CUDA targets are set at D=4096, 8k tokens
    if not args.cuda_only:
        cpu_table(dims, tokens[:1] if args.quick else tokens)
    if not args.cpu_only:
        cuda_table(dims, tokens)
    print(f"onnxruntime {ort.__version__}, onnx {onnx.__version__}")


if __name__ == "__main__":
    main()
