"""Graph passes of the torq-onnx export pipeline (onnx-ir InPlacePass classes), in order."""

from torq_onnx.passes.calibrate import Calibrate
from torq_onnx.passes.context import Consumer, ExportContext, Site, SiteStats
from torq_onnx.passes.finalize import Finalize, save_atomic
from torq_onnx.passes.find_linear_inputs import FindLinearInputs
from torq_onnx.passes.fold_rotations import FoldRotations
from torq_onnx.passes.insert_rotate_quantize import InsertRotateQuantize
from torq_onnx.passes.name_nodes import NameNodes
from torq_onnx.passes.quantize_weights import WEIGHT_MODES, QuantizeWeights
from torq_onnx.passes.solve_rotations import SolveRotations

__all__ = [
    "WEIGHT_MODES",
    "Calibrate",
    "Consumer",
    "ExportContext",
    "Finalize",
    "FindLinearInputs",
    "FoldRotations",
    "InsertRotateQuantize",
    "NameNodes",
    "QuantizeWeights",
    "Site",
    "SiteStats",
    "SolveRotations",
    "save_atomic",
]
