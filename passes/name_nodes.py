"""NameNodes: give every node a unique name (later passes and report.json refer to nodes by name)."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult


class NameNodes(InPlacePass):
    """Requires: nothing. Ensures: every main-graph node has a unique, non-empty name."""

    def call(self, model: ir.Model) -> PassResult:
        seen: set[str] = set()
        modified = False
        for i, node in enumerate(model.graph):
            if not node.name or node.name in seen:
                node.name = f"{node.op_type}_{i}"
                modified = True
            seen.add(node.name)
        return PassResult(model, modified)
