"""onnxruntime-genai generation speed of exports, with the ops' function bodies and with the
compiled custom-op library bundled in (``torq-onnx build-ops --genai``), side by side.

For each export folder: prefill time of the prompt and greedy decode tokens/s over
``--new-tokens`` steps (the median of ``--repeat`` runs), first as exported, then from a
copy of the folder (hard links where it can, so nothing is rewritten but the config) with the CPU library
bundled in. The runs alternate between the two, so a machine whose speed drifts slows both
alike. Run:
  python tools/bench_genai.py OUT [MORE_OUT ...] [--prompt TEXT] [--new-tokens 128] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime_genai as og

from torq_onnx.genai import bundle_custom_ops
from torq_onnx.models import load_tokenizer
from torq_onnx.runtime_ops import compiled


def timed_generation(model: og.Model, tokens: np.ndarray, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s) of one greedy generation."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=tokens.size + new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    start = time.perf_counter()
    gen.append_tokens(tokens[None])
    gen.generate_next_token()
    prefill = time.perf_counter() - start
    start, steps = time.perf_counter(), 0
    while not gen.is_done():
        gen.generate_next_token()
        steps += 1
    return prefill, steps / (time.perf_counter() - start)


def link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copy2(src, dst)


def with_library(out: Path, work: Path) -> Path:
    """A copy of export ``out`` (hard-linked files) with the compiled library bundled in; the
    bundling writes its files by atomic rename, so the originals behind the links stay as they are."""
    copy = work / out.name
    shutil.copytree(out, copy, copy_function=link_or_copy)
    bundle_custom_ops(copy, compiled.build_library())
    return copy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("exports", nargs="+", type=Path)
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    print(f"{'export':<24} {'ops':<14} {'prefill ms':>10} {'decode tok/s':>12} {'x body':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for out in args.exports:
            models = {"function body": og.Model(str(out)), "compiled lib": og.Model(str(with_library(out, Path(tmp))))}
            # the export's own tokenizer/ encodes the prompt: an export whose GGUF tokenizer was saved as
            # transformers reads it, not by models.portable_tokenizer, holds one genai reads as -1 ids
            tokens = np.array(load_tokenizer(out / "tokenizer").encode(args.prompt), dtype=np.int32)
            runs = {name: [] for name in models}
            for name, model in models.items():  # warm-up
                timed_generation(model, tokens, 8)
            for _ in range(args.repeat):
                for name, model in models.items():
                    runs[name].append(timed_generation(model, tokens, args.new_tokens))
            body_tps = float(np.median([r[1] for r in runs["function body"]]))
            for name, r in runs.items():
                prefill_ms, tps = 1e3 * float(np.median([x[0] for x in r])), float(np.median([x[1] for x in r]))
                print(f"{out.name[-24:]:<24} {name:<14} {prefill_ms:>10.1f} {tps:>12.1f} {body_tps / tps:>7.2f}")
    print(f"prompt {len(tokens)} tokens, {args.new_tokens} greedy new tokens, median of {args.repeat}; "
          f"onnxruntime-genai {og.__version__}")


if __name__ == "__main__":
    main()
