"""An exported torq model in ONNX Runtime on the GPU, against the same model on the CPU.

The ways to run one model.onnx on held-out token ids (strided 512-token windows):
  cpu       ORT CPU, whole graph (the op inlined from its ONNX function): the reference
  cuda-fn   ORT CUDA EP, whole graph: the op's ONNX function body run by ORT's CUDA kernels
  cuda-thread, cuda-warp
            the split runner: ORT CUDA segments + a fused CuPy kernel (a thread or a warp
            per MX block), one stream; a dense R_inter (torq, quarot exports) mixed by
            --mix (cuda.MIX_ROUTES)
  cpu-lib   ORT CPU, whole graph, the op as the compiled custom-op library's CPU kernel
  cuda-lib-thread, cuda-lib-warp
            ORT CUDA EP, whole graph, the op as the library's CUDA kernel (either fused
            kernel) on ORT's stream: one ORT run per pass
For each: perplexity, KL divergence from and top-1 agreement with the cpu run, time per
512-token forward pass (median of 10) and the tokens/s it gives, and for a model with a KV
cache greedy decode tokens/s after a 512-token prefill (median of 32 steps): "decode" as
``torq-onnx generate`` runs it (on the CUDA EP the cache stays in GPU memory, bound with
IOBinding), "fed" with the cache passed as numpy arrays (through host memory each step, the
baseline; only whole-graph CUDA rows differ). Needs onnxruntime-gpu
and CuPy for the CUDA rows; the library rows build the library (g++, nvcc, ORT's headers) or
say why they cannot.

Run: python tools/bench_cuda_session.py OUT/model.onnx --ids ids.npy | --tokenizer-dir OUT/tokenizer
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnxruntime as ort

from torq_onnx.errors import TorqError
from torq_onnx.evaluate import Reference, evaluation_ids, forward_ms, median_seconds, perplexity, sliding_windows
from torq_onnx.generate import binds_cache_by_default, greedy_decode_step
from torq_onnx.runtime_ops import compiled, cuda, load_session
from torq_onnx.runtime_ops.split_runner import SplitSession, cupy_kernel


def library_rows(model: str, on_cuda: bool, cuda_options: dict) -> list:
    """The compiled library's rows: its CPU kernel, and with the CUDA EP both fused kernels."""
    rows = []
    try:
        rows.append(("cpu-lib", load_session(model, custom_ops=True)))
        for kernel in sorted(cuda.ROTATE_KERNELS) if on_cuda else ():
            lib = compiled.build_library(cuda=True, kernel=kernel)
            rows.append((f"cuda-lib-{kernel}", load_session(model, providers=[("CUDAExecutionProvider", cuda_options)], custom_ops=lib)))
    except TorqError as exc:
        print(f"compiled library rows left out: {exc}")
    return rows


def decode_tokens_per_second(session, prompt: np.ndarray, bind_cache: bool | None = None, steps: int = 32) -> float | None:
    """Greedy decode tokens/s with the KV cache after a prefill of ``prompt`` (median step);
    None for a model without a cache."""
    step = greedy_decode_step(session, prompt, bind_cache)
    return None if step is None else 1.0 / median_seconds(step, steps, warmup=3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--ids", help=".npy of held-out token ids (else tokenized from the packaged text)")
    ap.add_argument("--tokenizer-dir", help="tokenizer folder, to tokenize the packaged held-out text")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--tf32", choices=["0", "1"], help="the CUDA EP's use_tf32 option (default: ORT's)")
    ap.add_argument("--mix", choices=cuda.MIX_ROUTES, default=cuda.DEFAULT_MIX_ROUTE,
                    help="how the split runner applies a dense R_inter (fmaf: the compiled library's bits)")
    args = ap.parse_args()
    if args.ids:
        ids = np.load(args.ids)[: args.max_tokens]
    else:
        from torq_onnx import models

        ids = evaluation_ids(models.load_tokenizer(Path(args.tokenizer_dir)), None, args.max_tokens)
    window = ids[:512]
    cpu = load_session(args.model)
    rows = [("cpu", cpu)]
    # onnxruntime-gpu lists its CUDA EP on a machine without a GPU too: the rows also need one CuPy sees
    has_ep = "CUDAExecutionProvider" in ort.get_available_providers()
    on_cuda = has_ep and cuda.available()
    opts = {"use_tf32": args.tf32} if args.tf32 else {}
    if on_cuda:
        rows.append(("cuda-fn", load_session(args.model, providers=[("CUDAExecutionProvider", opts)])))
        for kernel in cuda.ROTATE_KERNELS:
            rows.append((f"cuda-{kernel}", SplitSession(args.model, kernel=cupy_kernel(kernel, args.mix), device="cuda",
                                                        cuda_options=opts)))
    else:
        print("no CUDA rows: " + ("no CUDA GPU visible to CuPy" if has_ep else "onnxruntime-gpu is not installed"))
    rows += library_rows(args.model, on_cuda, opts)
    reference = Reference(cpu, cache=True)
    for w in sliding_windows(int(ids.size), 512, 256):  # the cpu logits, computed once, outside the timed runs
        reference.scored_logprobs(w, ids[w.begin : w.end])
    print(f"{'run':>15} {'PPL':>8} {'KL vs cpu':>10} {'top-1 vs cpu':>12} {'ms / 512-token pass':>20} {'tokens/s':>9} "
          f"{'decode tok/s':>12} {'fed tok/s':>9}")
    na = lambda v: "n/a" if v is None else f"{v:.1f}"  # noqa: E731
    for name, session in rows:
        ms = forward_ms(session, window, repeat=10)
        res = perplexity(session, ids, reference=reference)
        tps = window.size / ms * 1e3
        decode = decode_tokens_per_second(session, window)
        fed = decode  # the same path, unless the session keeps its cache on a GPU
        if decode is not None and binds_cache_by_default(session):
            fed = decode_tokens_per_second(session, window, bind_cache=False)
        print(f"{name:>15} {res.perplexity:>8.3f} {res.kl_divergence:>10.5f} {res.top1_agreement:>12.4f} {ms:>20.1f} {tps:>9.0f} "
              f"{na(decode):>12} {na(fed):>9}")
    print(f"{ids.size} tokens; use_tf32={args.tf32 or 'default'}; split runner's mix={args.mix}; onnxruntime {ort.__version__}; providers {ort.get_available_providers()}")


if __name__ == "__main__":
    main()
