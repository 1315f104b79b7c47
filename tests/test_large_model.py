"""A model whose ONNX exceeds protobuf's 2 GB: external data in and out, bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from tiny_models import char_tokenizer

pytestmark = pytest.mark.large


@pytest.fixture(scope="module")
def big_llama_dir(tmp_path_factory):
    """A random LLaMA of 2.5 GB in float32: a 300k vocabulary with untied embedding and LM
    head (1.2 GB each) over 2 small layers, so the graph needs external data while the
    export stays a few minutes on a 2-core machine."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300_000, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("big_llama")
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    char_tokenizer(path)
    return path, 4 * sum(p.numel() for p in model.parameters())


def test_model_over_2gb_exports_loads_and_evaluates(big_llama_dir, tmp_path):
    src, fp32_bytes = big_llama_dir
    assert fp32_bytes > 2**31
    out = tmp_path / "out"
    run = [sys.executable, "-c", "from torq_onnx.cli import app; app()"]
    res = subprocess.run([*run, "export", str(src), "-o", str(out), "--calib-samples", "4", "--seq-len", "128", "--quiet"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    data = out / "model.onnx.data"
    assert data.is_file() and data.stat().st_size > 2**31  # the float embedding and LM head alone are 2.4 GB
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert any(n.op_type == "TorqRotateQuantize" for n in proto.graph.node)
    report = json.loads((out / "report.json").read_text())
    # the process that calibrates and rewrites holds at most 3x the float32 model
    assert report["peak_rss_mib"] * 2**20 <= 3 * fp32_bytes, report["peak_rss_mib"]
    res = subprocess.run([*run, "eval", str(out), "--seq-len", "64", "--stride", "32", "--max-tokens", "256", "--quiet"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert np.isfinite(float(res.stdout.split("perplexity")[1].split()[0]))
