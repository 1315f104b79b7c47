"""What ``torq-onnx inspect`` reports about an ONNX model, read without loading its weights:
the export's settings, the torq ops, the transforms' shapes, the interface and the sizes."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from torq_onnx.errors import TorqError
from torq_onnx.models import check_onnx_file
from torq_onnx.runtime_ops import DOMAIN
from torq_onnx.runtime_ops.functions import DEQUANTIZE_WEIGHT, ONLINE_OPS

MIB = 1 << 20


def _is_one(tensor: TensorProto) -> bool:
    """A [1, 1] initializer holding 1: the op's identity R_inter (no block mixing). Such a
    tensor is always stored inline (4 bytes), so this reads no external data."""
    inline = tensor.data_location != TensorProto.EXTERNAL
    return list(tensor.dims) == [1, 1] and inline and numpy_helper.to_array(tensor).item() == 1.0


def tensor_bytes(tensor: TensorProto) -> int:
    """Bytes of ``tensor``'s values as stored, from its shape and type (no data is read)."""
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def names(values) -> str:
    """Value names, those that differ only by a layer index folded into one entry with a count
    (``past_key_values.*.key x30``)."""
    groups = Counter(re.sub(r"\.\d+(?=\.|$)", ".*", v.name) for v in values)
    return ", ".join(name if n == 1 else f"{name} x{n}" for name, n in groups.items()) or "-"


def _shapes(tensors: list[TensorProto]) -> str:
    return ", ".join(sorted({"x".join(map(str, t.dims)) + (" (identity)" if _is_one(t) else "") for t in tensors})) or "-"


def summarize(path: Path) -> list[tuple[str, str]]:
    """(field, value) rows describing the model at ``path`` (an .onnx file, or an export's
    folder: its model.onnx); a TorqError for a missing or unreadable file."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.onnx"
    if not path.is_file():
        raise TorqError(f"no file at {path}")
    m = check_onnx_file(path)
    rows = sorted((p.key, p.value) for p in m.metadata_props)
    counts = Counter(n.op_type for n in m.graph.node if n.domain == DOMAIN)
    rows += [(f"ops {DOMAIN}::{op}", str(n)) for op, n in sorted(counts.items())]
    inits = {t.name: t for t in m.graph.initializer}
    sites = [n for n in m.graph.node if n.domain == DOMAIN and n.op_type in ONLINE_OPS]
    rows.append(("R_inter shapes", _shapes([inits[n.input[1]] for n in sites if n.input[1] in inits])))
    rows.append(("R_intra shapes", _shapes([inits[n.input[2]] for n in sites if len(n.input) > 2 and n.input[2] in inits])))
    rows.append(("opsets", ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in m.opset_import)))
    rows.append(("inputs", names(m.graph.input)))
    rows.append(("outputs", names(m.graph.output)))
    packed = {name for n in m.graph.node if n.domain == DOMAIN and n.op_type == DEQUANTIZE_WEIGHT for name in n.input}
    size = Counter()
    for t in m.graph.initializer:
        size["MXFP4 (codes and scales)" if t.name in packed else TensorProto.DataType.Name(t.data_type).lower()] += tensor_bytes(t)
    rows.append(("weights", ", ".join(f"{kind} {n / MIB:.1f} MiB" for kind, n in size.most_common()) or "-"))
    files = {path.name: path.stat().st_size}
    for t in m.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            location = next(e.value for e in t.external_data if e.key == "location")
            data = path.parent / location
            files[location] = data.stat().st_size if data.is_file() else -1
    rows.append(("files", ", ".join(f"{name} {n / MIB:.1f} MiB" if n >= 0 else f"{name} MISSING" for name, n in files.items())))
    return rows
