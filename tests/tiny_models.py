"""Tiny models built in the tests: a transformer-shaped ONNX graph and a character tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from torq_onnx.runtime_ops import functions as F

D, FF, VOCAB = 64, 128, 50


def tiny_transformer(d: int = D, ff: int = FF, seed: int = 0, outlier: bool = True) -> onnx.ModelProto:
    """Embedding -> [q,k,v share x] -> o -> residual -> [gate,up share h] -> down -> LM head."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((VOCAB, d)).astype(np.float32)
    if outlier:
        emb[:, 5] += 30.0  # a massive, nearly constant channel, as in real LLMs
    w = lambda *s: (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)  # noqa: E731
    inits = {"emb": emb, "wq": w(d, d), "wk": w(d, d), "wv": w(d, d), "wo": w(d, d), "wg": w(d, ff), "wu": w(d, ff), "wd": w(ff, d), "head": w(d, VOCAB)}
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["x"]),
        helper.make_node("MatMul", ["x", "wq"], ["q"]),
        helper.make_node("MatMul", ["x", "wk"], ["k"]),
        helper.make_node("MatMul", ["x", "wv"], ["v"]),
        helper.make_node("Mul", ["q", "k"], ["qk"]),
        helper.make_node("Add", ["qk", "v"], ["attn"]),
        helper.make_node("MatMul", ["attn", "wo"], ["o"]),
        helper.make_node("Add", ["x", "o"], ["h"]),
        helper.make_node("MatMul", ["h", "wg"], ["g"]),
        helper.make_node("MatMul", ["h", "wu"], ["u"]),
        helper.make_node("Sigmoid", ["g"], ["gs"]),
        helper.make_node("Mul", ["g", "gs"], ["silu"]),
        helper.make_node("Mul", ["silu", "u"], ["act"]),
        helper.make_node("MatMul", ["act", "wd"], ["down"]),
        helper.make_node("Add", ["h", "down"], ["h2"]),
        helper.make_node("MatMul", ["h2", "head"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "t"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "t", VOCAB])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=F.IR_VERSION)


def batches(n: int = 6, t: int = 16, seed: int = 1):
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, VOCAB, (1, t)).astype(np.int64)} for _ in range(n)]


def run(model: onnx.ModelProto | ir.Model, feeds: dict) -> np.ndarray:
    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def char_tokenizer(out_dir: Path, vocab_size: int = VOCAB) -> Path:
    """A character-level fast tokenizer with ``vocab_size`` ids (the most common characters of
    the built-in corpus plus [UNK]), saved as an HF tokenizer folder."""
    from collections import Counter

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from torq_onnx.text import builtin_corpus

    common = [c for c, _ in Counter(builtin_corpus()).most_common(vocab_size - 1)]
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(common)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(out_dir))
    return out_dir
