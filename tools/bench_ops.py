"""Benchmark TorqRotateQuantize: numpy reference vs ORT CPU (ONNX function) vs CUDA, beside a MatMul.

Prints one table. Run: python tools/bench_ops.py [--quick]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from torq_onnx import torq
from torq_onnx.runtime_ops import functions as F
from torq_onnx.runtime_ops import reference as ref


def best_time(fn, repeat: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def op_session(d: int) -> ort.InferenceSession:
    b = d // 32
    graph = helper.make_graph(
        [F.make_rotate_quantize_node("x", "ri", "rk", "y")], "bench",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", d]), helper.make_tensor_value_info("ri", TensorProto.FLOAT, [b, b]),
         helper.make_tensor_value_info("rk", TensorProto.FLOAT, [32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", d])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", F.STD_OPSET)])
    F.attach_functions(model)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def matmul_session(d: int) -> ort.InferenceSession:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", d]), helper.make_tensor_value_info("w", TensorProto.FLOAT, [d, d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", d])],
    )
    return ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString(), providers=["CPUExecutionProvider"])


def cuda_columns(x: np.ndarray, rot: torq.Rotation) -> tuple[str, str]:
    try:
        from torq_onnx.runtime_ops import cuda
    except Exception:
        return "n/a", "n/a"
    if not cuda.available():
        return "n/a (no GPU)", "n/a"
    t, gbps, copy_gbps = cuda.benchmark(x, rot.r_inter, rot.r_intra)
    return f"{t * 1e3:.3f}", f"{gbps:.0f} / {copy_gbps:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="D in {2048, 4096}, 1k tokens only")
    args = ap.parse_args()
    dims = [2048, 4096] if args.quick else [2048, 4096, 8192]
    tokens = [1024] if args.quick else [1024, 8192]
    rows = []
    for d in dims:
        rot = torq.solve_rotation("quarot", d, seed=0)
        ri, rk = rot.r_inter.astype(np.float32), rot.r_intra.astype(np.float32)
        sess, mm = op_session(d), matmul_session(d)
        w = np.random.default_rng(1).standard_normal((d, d)).astype(np.float32)
        for t in tokens:
            x = np.random.default_rng(0).standard_normal((t, d)).astype(np.float32)
            t_ref = best_time(lambda: ref.rotate_quantize(x, ri, rk), repeat=1)
            t_ort = best_time(lambda: sess.run(None, {"x": x, "ri": ri, "rk": rk}))
            t_mm = best_time(lambda: mm.run(None, {"x": x, "w": w}))
            cuda_ms, cuda_bw = cuda_columns(x, rot)
            rows.append((d, t, t_ref * 1e3, t_ort * 1e3, t_mm * 1e3, t_ort / t_mm, cuda_ms, cuda_bw))
    hdr = f"{'D':>5} {'tokens':>6} {'numpy ref ms':>12} {'ORT CPU op ms':>13} {'ORT MatMul ms':>13} {'op/MatMul':>9} {'CUDA op ms':>12} {'CUDA GB/s / copy GB/s':>22}"
    print(hdr)
    print("-" * len(hdr))
    for d, t, a, b, c, r, cm, cb in rows:
        print(f"{d:>5} {t:>6} {a:>12.1f} {b:>13.1f} {c:>13.1f} {r:>9.2f} {cm:>12} {cb:>22}")
    print(f"onnxruntime {ort.__version__}, onnx {onnx.__version__}; CPU threads = ORT default")


if __name__ == "__main__":
    main()
