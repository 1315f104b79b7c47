"""Fixtures shared by several test modules."""

from __future__ import annotations

import functools
import shutil
import subprocess

import pytest


@functools.cache
def gpu_visible() -> bool:
    """A CUDA GPU this process can use: CuPy sees one, or (without CuPy) nvidia-smi lists one."""
    from torq_onnx.runtime_ops import cuda

    if cuda.available():
        return True
    smi = shutil.which("nvidia-smi")
    return bool(smi) and subprocess.run([smi, "-L"], capture_output=True, text=True).stdout.startswith("GPU ")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--emulated-cupy", action="store_true",
                     help="rehearse the CuPy route's GPU tests on the CPU (pytest -m gpu --emulated-cupy): CuPy replaced "
                          "by tests/emulated_cupy.py, each kernel launch run on the host emulator of CUDA threads; the "
                          "tests that need ORT's CUDA EP still skip")


def pytest_configure(config: pytest.Config) -> None:
    # before collection: the GPU modules read cuda.available() when they are imported
    if config.getoption("--emulated-cupy"):
        import tempfile
        from pathlib import Path

        import emulated_cupy
        from test_cuda_emulated import CXX, build_harness

        if CXX is None:
            raise pytest.UsageError("--emulated-cupy needs a C++20 compiler (g++) for the kernel emulator")
        folder = tempfile.mkdtemp(prefix="torq-emulated-cupy-")
        config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))
        emulated_cupy.install(build_harness(Path(folder) / "kernel_harness"))


def pytest_runtest_setup(item: pytest.Item) -> None:
    # onnxruntime-gpu lists its CUDA EP wherever it is installed, GPU or not: without a GPU a
    # CUDA session silently runs on the CPU, so a `gpu` test would fail rather than skip
    if item.get_closest_marker("gpu") and not gpu_visible():
        pytest.skip("needs a CUDA GPU (none is visible)")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A randomly initialized 2-layer LLaMA (hidden 64, MLP 128) saved as an HF folder,
    with the character tokenizer: exercises the decoder (text-generation) export path."""
    from tiny_models import char_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    import torch

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    char_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def exported_decoder(tiny_llama_dir, tmp_path_factory):
    """``tiny_llama_dir`` exported with the default method (KV cache, packed MXFP4 weights):
    its ``model.onnx``."""
    from typer.testing import CliRunner

    from torq_onnx.cli import app

    out = tmp_path_factory.mktemp("exported_decoder") / "out"
    res = CliRunner().invoke(app, ["export", str(tiny_llama_dir), "-o", str(out), "--calib-samples", "2", "--seq-len", "64", "--quiet"])
    assert res.exit_code == 0, res.output
    return out / "model.onnx"


@pytest.fixture(scope="session")
def library():
    """The compiled custom-op library's CPU build, with warnings as errors (ORT's headers
    fetched once if not cached): its path."""
    from torq_onnx.errors import TorqError
    from torq_onnx.runtime_ops import compiled

    try:
        compiled.ort_headers()
    except TorqError as exc:  # no npm, or the registry unreachable: nothing to build against
        pytest.skip(f"no ONNX Runtime headers here: {exc}")
    return compiled.build_library(strict=True)
