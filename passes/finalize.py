"""Finalize: make the rewritten model self-contained, valid and saved atomically."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from torq_onnx.atomic import replace_dir
from torq_onnx.errors import TorqError
from torq_onnx.runtime_ops.functions import DOMAIN, DOMAIN_VERSION, STD_OPSET, all_functions

EXTERNAL_DATA_THRESHOLD = 1 << 30  # bytes of initializers above which weights go to model.onnx.data
MODEL_FILE, DATA_FILE = "model.onnx", "model.onnx.data"  # what save_atomic writes besides the extras
MODEL_FILES = (MODEL_FILE, DATA_FILE)


class Finalize(InPlacePass):
    """Attach the ai.torq functions, opset imports and metadata.

    Requires: a model whose torq nodes come from InsertRotateQuantize/QuantizeWeights.
    Ensures: the model declares ``ai.torq`` v1 and the default opset >= 18 (the function
    bodies need it) and carries every torq function, so any ORT can run it;
    ``metadata`` is written to ``metadata_props`` (method, scale rule, versions).
    """

    def __init__(self, metadata: dict[str, str] | None = None) -> None:
        super().__init__()
        self.metadata = metadata or {}

    def call(self, model: ir.Model) -> PassResult:
        opset = model.opset_imports.get("", 0)
        if opset < STD_OPSET:
            raise TorqError(
                f"the model uses ONNX opset {opset}; torq functions need >= {STD_OPSET}: "
                "re-export with a newer opset (torq-onnx export does this for HF models)"
            )
        for proto in all_functions(opset):
            fn = ir.serde.deserialize_function(proto)
            model.functions[fn.identifier()] = fn
        model.opset_imports[DOMAIN] = DOMAIN_VERSION
        model.metadata_props.update({f"torq.{k}": str(v) for k, v in self.metadata.items()})
        return PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        assert DOMAIN in model.opset_imports


INLINE_BYTES = 256  # tensors up to this size stay inside model.onnx when the weights go to model.onnx.data


def inline_external_tensors(model: ir.Model, max_bytes: int | None = None) -> None:
    """Load external tensors into memory: every initializer (or those of at most ``max_bytes``)
    and every tensor attribute, in all graphs. A saved model must not point into its
    source's or a working copy's data file, and ``ir.save`` moves only larger initializers
    to the new one (exporters also put Constant attributes in external data)."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor) and (max_bytes is None or tensor.nbytes <= max_bytes):
                value.const_value = ir.external_data.convert_tensors_from_external([tensor])[0]
        for node in graph:
            for name, attr in list(node.attributes.items()):
                if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                    node.attributes[name] = ir.AttrTensor(name, ir.external_data.convert_tensors_from_external([attr.value])[0])


def check_model(proto: onnx.ModelProto) -> None:
    """ONNX checker + strict shape inference (in memory when the model is small enough)."""
    if proto.ByteSize() < (2 << 30) - (1 << 20):
        onnx.checker.check_model(proto, full_check=True)


def save_atomic(model: ir.Model, out_dir: Path, extras: dict[str, object] | None = None) -> Path:
    """Write model.onnx (+ model.onnx.data when large) and JSON extras into ``out_dir``.

    Everything is written to a temporary sibling folder first and moved into place at the
    end, so a failure never leaves a half-written output.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise TorqError(f"output folder {out_dir} exists and is a file")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
        if size > EXTERNAL_DATA_THRESHOLD:  # streamed tensor by tensor, weights the export kept on disk included
            inline_external_tensors(model, max_bytes=INLINE_BYTES)
            ir.save(model, tmp / MODEL_FILE, external_data=DATA_FILE, size_threshold_bytes=INLINE_BYTES)
        else:
            inline_external_tensors(model)  # weights still memory-mapped from a working copy go inline
            proto = ir.serde.serialize_model(model)
            check_model(proto)
            onnx.save_model(proto, tmp / MODEL_FILE)
        for name, obj in (extras or {}).items():
            if isinstance(obj, Path):
                shutil.copytree(obj, tmp / name)
            elif isinstance(obj, (bytes, bytearray)):
                (tmp / name).write_bytes(obj)
            else:
                (tmp / name).write_text(json.dumps(obj, indent=2, default=float))
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / MODEL_FILE
