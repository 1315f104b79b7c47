"""Source dtypes: bfloat16 checkpoints export as exact float32 (or float16) graphs; a bfloat16
ONNX graph, which ORT's CPU provider cannot calibrate, is a clear error."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from torq_onnx import models
from torq_onnx.cli import app
from torq_onnx.errors import TorqError
from torq_onnx.pipeline import ExportOptions, rewrite

from tiny_models import batches, char_tokenizer, tiny_transformer


@pytest.fixture(scope="module")
def bf16_llama_dir(tmp_path_factory):
    """A random 2-layer LLaMA checkpoint saved in bfloat16, as most current LLMs ship."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    path = tmp_path_factory.mktemp("bf16_llama")
    LlamaForCausalLM(cfg).to(torch.bfloat16).eval().save_pretrained(path)
    char_tokenizer(path)
    return path


def test_bf16_checkpoint_becomes_an_exact_float32_graph(bf16_llama_dir):
    import torch
    from safetensors.torch import load_file

    src = models.resolve(str(bf16_llama_dir))
    try:
        graph = onnx.load(str(src.onnx_path)).graph
        weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    finally:
        src.cleanup()
    ckpt = load_file(str(bf16_llama_dir / "model.safetensors"))
    emb = ckpt["model.embed_tokens.weight"]
    assert emb.dtype == torch.bfloat16
    got = weights["model.embed_tokens.weight"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, emb.float().numpy())  # bf16 -> fp32 is exact


@pytest.mark.parametrize("dtype, elem", [(None, onnx.TensorProto.FLOAT), ("fp16", onnx.TensorProto.FLOAT16)])
def test_bf16_checkpoint_exports_w4a4(bf16_llama_dir, tmp_path, dtype, elem):
    out = tmp_path / "out"
    flags = ["--dtype", dtype] if dtype else []
    res = CliRunner().invoke(app, ["export", str(bf16_llama_dir), "-o", str(out), "--calib-samples", "2", "--seq-len", "64", "--quiet", *flags])
    assert res.exit_code == 0, res.output
    assert onnx.load(str(out / "model.onnx")).graph.output[0].type.tensor_type.elem_type == elem
    res = CliRunner().invoke(app, ["eval", str(out), "--seq-len", "64", "--stride", "32", "--max-tokens", "200", "--quiet"])
    assert res.exit_code == 0 and np.isfinite(float(res.output.split("perplexity")[1].split()[0])), res.output


def test_dtype_flag_is_refused_for_an_onnx_source(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(tiny_transformer(), path)
    res = CliRunner().invoke(app, ["export", str(path), "-o", str(tmp_path / "o"), "--dtype", "fp16"])
    assert res.exit_code == 2 and "keeps its own dtype" in " ".join(res.output.split())


def test_bf16_onnx_graph_is_a_clear_error():
    model = ir.serde.deserialize_model(tiny_transformer())
    for value in model.graph.initializers.values():  # weights stored as bfloat16, upcast for the MatMuls
        value.const_value = ir.tensor(value.const_value.numpy().astype(ir.DataType.BFLOAT16.numpy()), name=value.name)
        value.dtype = ir.DataType.BFLOAT16
    with pytest.raises(TorqError, match="bfloat16"):
        rewrite(model, batches(), ExportOptions(progress=False))
