"""onnxruntime-genai support: the ``genai_config.json`` that lets ``onnxruntime_genai.Model(OUT)``
drive an export with its KV cache (the torq ops are model-local ONNX functions, which the
ORT session that genai creates inlines like any other)."""

from __future__ import annotations

import json
from pathlib import Path

import onnx_ir as ir

from torq_onnx import calibration as calib
from torq_onnx.atomic import write_bytes_atomic, write_text_atomic
from torq_onnx.errors import TorqError

# files genai's tokenizer reads from the model folder (export also keeps them in tokenizer/)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
CONFIG_FILE = "genai_config.json"


def _first(value):
    return value[0] if isinstance(value, list) else value


def genai_config(model_ir: ir.Model, hf_dir: Path | None) -> dict | None:
    """The genai config of a KV-cache decoder export, or None when the export is not one
    (no ``past_key_values.*`` inputs) or its source has no HF ``config.json`` to describe it."""
    inputs = {v.name for v in model_ir.graph.inputs}
    if not any(calib.is_past_input(n) for n in inputs) or hf_dir is None or not (hf_dir / "config.json").is_file():
        return None
    hf = json.loads((hf_dir / "config.json").read_text())
    heads = hf["num_attention_heads"]
    context = hf.get("max_position_embeddings", 2048)
    eos = hf.get("eos_token_id")
    decoder_inputs = {"input_ids": "input_ids", "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    decoder_inputs.update({n: n for n in ("attention_mask", "position_ids") if n in inputs})
    return {
        "model": {
            "bos_token_id": hf.get("bos_token_id"),
            "eos_token_id": eos,
            "pad_token_id": hf.get("pad_token_id") if hf.get("pad_token_id") is not None else _first(eos),
            "context_length": context,
            "vocab_size": hf["vocab_size"],
            "type": hf.get("model_type", "llama"),
            "decoder": {
                "session_options": {"log_id": "torq-onnx", "provider_options": []},
                "filename": "model.onnx",
                "head_size": hf.get("head_dim") or hf["hidden_size"] // heads,
                "hidden_size": hf["hidden_size"],
                "inputs": decoder_inputs,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
                "num_attention_heads": heads,
                "num_hidden_layers": hf["num_hidden_layers"],
                "num_key_value_heads": hf.get("num_key_value_heads", heads),
            },
        },
        "search": {  # greedy by default; the present cache is a new tensor each step, not a shared buffer
            "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": context, "min_length": 0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0,
            "diversity_penalty": 0.0, "no_repeat_ngram_size": 0, "early_stopping": True, "past_present_share_buffer": False,
        },
    }


def bundle_config(out_dir: Path) -> Path:
    """The genai config of the export ``out_dir`` that :func:`bundle_custom_ops` rewrites, or
    a TorqError naming what is missing (checked before the library is built)."""
    if not Path(out_dir).is_dir():
        raise TorqError(f"no export folder at {out_dir}")
    config_path = Path(out_dir) / CONFIG_FILE
    if not config_path.is_file():
        raise TorqError(f"no {CONFIG_FILE} in {out_dir}: onnxruntime-genai runs exports of decoders with a KV cache")
    return config_path


def bundle_custom_ops(out_dir: Path, library: Path) -> Path:
    """Copy the compiled custom-op ``library`` into the export ``out_dir`` and name it in its
    genai config (the decoder's ``session_options.custom_ops_library``), so onnxruntime-genai
    runs the compiled ops instead of their function bodies. genai loads such a library only
    from inside the model folder, so it is copied rather than referenced. Both files are
    written atomically; returns the copy's path."""
    config_path = bundle_config(out_dir)
    try:
        config = json.loads(config_path.read_text())
        session_options = config["model"]["decoder"]["session_options"]
    except (ValueError, KeyError, TypeError) as exc:
        raise TorqError(f"{config_path} is not a genai config with model.decoder.session_options: {exc}") from exc
    name = Path(library).name.split("-")[0].removesuffix(".so") + ".so"  # the cache's content hash dropped
    target = write_bytes_atomic(Path(out_dir) / name, Path(library).read_bytes())
    target.chmod(0o755)
    session_options["custom_ops_library"] = target.name  # genai resolves it against the model folder
    write_text_atomic(config_path, json.dumps(config, indent=2))
    return target
