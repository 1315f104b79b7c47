"""Run an exported torq model in ONNX Runtime with the online op computed outside ORT.

The graph is cut at every ``TorqRotateQuantize`` node into ORT sub-graphs ("segments");
between two segments a pluggable *kernel* computes the op. This is the route by which an
ORT session with the CUDA execution provider runs the CuPy kernel: segments run with
IOBinding on device OrtValues, the kernel reads and writes those same device buffers
(zero copy, through their data pointers), and no value goes to the host between segments.
On CPU the same runner, with the numpy reference or the op's own ONNX function as the
kernel, checks that the splitting is exact.

Cost model: one ORT run per segment (sites + 1 per forward; for SmolLM2-135M 121 runs) and
one kernel launch (two GEMMs + the quantizer) per site. The per-run host overhead of ORT
(tens of microseconds) is paid once per segment, so this pays off when the fused kernel
saves more than that over the op's inlined ONNX function body.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from torq_onnx.errors import TorqError
from torq_onnx.runtime_ops.functions import DOMAIN, IR_VERSION, ROTATE_QUANTIZE, bump_threshold, scale_rule_of


@dataclass
class OnlineOp:
    """One ``TorqRotateQuantize`` node, taken out of the graph."""

    x: str
    y: str
    r_inter: np.ndarray
    r_intra: np.ndarray
    bump_threshold: float

    @property
    def scale_rule(self) -> str:
        return scale_rule_of(self.bump_threshold)


@dataclass
class Segment:
    """A run of ordinary nodes as its own ONNX model."""

    model: onnx.ModelProto
    inputs: list[str]
    outputs: list[str]
    session: object = None  # the ORT session, created by SplitSession
    drop_after: list[str] = field(default_factory=list)  # values no later part reads


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    return {vi.name: vi.type for vi in [*g.input, *g.value_info, *g.output]}


def split_model(model: onnx.ModelProto) -> list[Segment | OnlineOp]:
    """Cut ``model`` (nodes in topological order, as exported) at its TorqRotateQuantize
    nodes: alternating segments and online ops, in execution order."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    types = _value_types(model)
    groups: list[list[onnx.NodeProto] | onnx.NodeProto] = [[]]
    for node in graph.node:
        if node.domain == DOMAIN and node.op_type == ROTATE_QUANTIZE:
            groups += [node, []]
        else:
            groups[-1].append(node)
    # names read by each group, to know which segment outputs are needed later
    reads = [[n for node in (g if isinstance(g, list) else [g]) for n in node.input if n] for g in groups]
    needed_after = [set(o.name for o in graph.output)]
    for r in reversed(reads[1:]):
        needed_after.insert(0, needed_after[0] | set(r))
    parts: list[Segment | OnlineOp] = []
    for k, group in enumerate(groups):
        if not isinstance(group, list):
            attrs = {a.name: helper.get_attribute_value(a) for a in group.attribute}
            x, r_inter, r_intra = group.input
            if r_inter not in inits or r_intra not in inits:
                raise TorqError(f"{group.name}: rotation inputs must be initializers to split the graph")
            parts.append(OnlineOp(x, group.output[0], numpy_helper.to_array(inits[r_inter]), numpy_helper.to_array(inits[r_intra]),
                                  float(attrs.get("bump_threshold", bump_threshold("floor")))))
            continue
        if not group:
            continue
        produced = {o for node in group for o in node.output}
        used = list(dict.fromkeys(reads[k]))
        seg_inputs = [v for v in used if v not in produced and v not in inits]
        seg_outputs = [v for node in group for v in node.output if v and v in needed_after[k]]
        missing = [v for v in seg_inputs + seg_outputs if v not in types]
        if missing:
            raise TorqError(f"cannot split the graph: no type known for {', '.join(missing[:5])}")
        sub = helper.make_graph(group, f"segment{k}",
                                [helper.make_value_info(v, types[v]) for v in seg_inputs],
                                [helper.make_value_info(v, types[v]) for v in seg_outputs],
                                [inits[v] for v in used if v in inits])
        seg_model = helper.make_model(sub, opset_imports=list(model.opset_import), functions=list(model.functions),
                                      ir_version=model.ir_version)
        parts.append(Segment(seg_model, seg_inputs, seg_outputs))
    return parts


Kernel = Callable[[object, OnlineOp], object]


def numpy_kernel(x: np.ndarray, op: OnlineOp) -> np.ndarray:
    """The numpy reference op (float32 GEMMs in numpy: agrees with ORT's up to summation order)."""
    from torq_onnx.runtime_ops.reference import rotate_quantize

    return rotate_quantize(x, op.r_inter, op.r_intra, op.scale_rule)


def ort_function_kernel() -> Kernel:
    """The op's own ONNX function in a one-node CPU session per site: the same arithmetic as
    the whole-graph session, so a split run with it is bit-identical to the unsplit one."""
    import onnxruntime as ort

    from torq_onnx.runtime_ops.functions import attach_functions, make_rotate_quantize_node

    sessions: dict[int, object] = {}

    def run(x: np.ndarray, op: OnlineOp) -> np.ndarray:
        if id(op) not in sessions:
            t = helper.np_dtype_to_tensor_dtype(x.dtype)
            node = make_rotate_quantize_node("x", "ri", "rk", "y", op.scale_rule)
            g = helper.make_graph([node], "op", [helper.make_tensor_value_info("x", t, None)], [helper.make_tensor_value_info("y", t, None)],
                                  [numpy_helper.from_array(op.r_inter.astype(np.float32), "ri"), numpy_helper.from_array(op.r_intra.astype(np.float32), "rk")])
            m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=IR_VERSION)
            attach_functions(m)
            sessions[id(op)] = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return sessions[id(op)].run(None, {"x": x})[0]

    return run


@dataclass
class ValueSpec:
    """A graph input or output as ``session.get_inputs()`` describes it (name, type, shape)."""

    name: str
    type: str
    shape: list


def _value_specs(values) -> list[ValueSpec]:
    def spec(vi: onnx.ValueInfoProto) -> ValueSpec:
        t = vi.type.tensor_type
        elem = onnx.TensorProto.DataType.Name(t.elem_type).lower()
        return ValueSpec(vi.name, f"tensor({elem})", [d.dim_param or d.dim_value for d in t.shape.dim])

    return [spec(v) for v in values]


class SplitSession:
    """An exported torq model run as ORT segments with the online op in ``kernel``; has the
    ``run``/``get_inputs``/``get_outputs`` of an ``InferenceSession``, so the evaluation code
    takes it as one.

    CPU (default): numpy values between segments. ``device="cuda"``: every segment runs on
    the CUDA execution provider on one CUDA stream that CuPy shares (ORT's
    ``user_compute_stream``). Values stay on the device: segment outputs are ORT-allocated
    device OrtValues that the kernel reads through a CuPy view of their memory, kernel
    outputs (CuPy arrays) are bound to the next segment by pointer, and ORT is told not to
    synchronize after each segment, so a forward pass is queued without host waits and is
    synchronized once, when the outputs are copied to the host. ``kernel`` then takes and
    returns CuPy arrays (default: the fused kernel of :mod:`torq_onnx.runtime_ops.cuda`);
    ``cuda_options`` are further CUDA execution provider options (e.g. ``{"use_tf32": "0"}``).
    """

    def __init__(self, path_or_model, kernel: Kernel | None = None, device: str = "cpu", sess_options=None, device_id: int = 0,
                 cuda_options: dict | None = None) -> None:
        import onnxruntime as ort

        from torq_onnx.runtime_ops import register

        if device not in ("cpu", "cuda"):
            raise TorqError(f"device must be 'cpu' or 'cuda', not {device!r}")
        model = path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load(str(path_or_model))
        self.device, self.device_id = device, device_id
        self.parts = split_model(model)
        self._inputs, self._outputs = _value_specs(model.graph.input), _value_specs(model.graph.output)
        self.outputs = [o.name for o in self._outputs]
        self._run_options = None
        if device == "cuda":
            import cupy as cp

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise TorqError("device='cuda' needs onnxruntime-gpu (CUDAExecutionProvider is not available)")
            with cp.cuda.Device(device_id):
                self.stream = cp.cuda.Stream(non_blocking=True)
            options = {**(cuda_options or {}), "device_id": device_id, "user_compute_stream": str(self.stream.ptr)}
            providers = [("CUDAExecutionProvider", options)]
            self._run_options = ort.RunOptions()
            self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        else:
            providers = ["CPUExecutionProvider"]
        for part in self.parts:
            if isinstance(part, Segment):
                part.session = ort.InferenceSession(part.model.SerializeToString(), sess_options=register(sess_options), providers=providers)
        if kernel is None:
            kernel = cupy_kernel() if device == "cuda" else numpy_kernel
        self.kernel = kernel
        self._plan_drops()

    def get_inputs(self) -> list[ValueSpec]:
        return list(self._inputs)

    def get_outputs(self) -> list[ValueSpec]:
        return list(self._outputs)

    def _plan_drops(self) -> None:
        """After each segment, forget the values no later part (or graph output) reads."""
        later: set[str] = set(self.outputs)
        for part in reversed(self.parts):
            if isinstance(part, Segment):
                part.drop_after = [v for v in part.inputs if v not in later]
                later |= set(part.inputs)
            else:
                later.add(part.x)

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list:
        if self.device == "cpu":
            return self._forward(output_names, dict(feeds))
        with self.stream:  # CuPy launches go to the stream ORT runs on
            values = {k: self._to_device(v) for k, v in feeds.items()}
            device_outs = self._forward(output_names, values)
            self.stream.synchronize()  # the one wait per forward pass
            return [_to_host(v) for v in device_outs]

    def _forward(self, output_names: list[str] | None, values: dict) -> list:
        for part in self.parts:
            if isinstance(part, OnlineOp):
                values[part.y] = self.kernel(values[part.x], part)
                continue
            outs = self._run_segment(part, values)
            values.update(zip(part.outputs, outs))
            for v in part.drop_after:
                values.pop(v, None)
        return [values[n] for n in (output_names or self.outputs)]

    def _run_segment(self, seg: Segment, values: dict) -> list:
        if self.device == "cpu":
            return seg.session.run(seg.outputs, {k: values[k] for k in seg.inputs})
        binding = seg.session.io_binding()
        for k in seg.inputs:
            v = values[k]
            if hasattr(v, "data_ptr"):  # an OrtValue from an earlier segment or the feeds
                binding.bind_ortvalue_input(k, v)
            else:  # a CuPy array from the kernel, bound by pointer (it stays alive in `values`)
                binding.bind_input(k, "cuda", self.device_id, v.dtype.type, list(v.shape), v.data.ptr)
        for k in seg.outputs:
            binding.bind_output(k, "cuda", self.device_id)
        seg.session.run_with_iobinding(binding, self._run_options)
        return binding.get_outputs()

    def _to_device(self, array: np.ndarray):
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", self.device_id)


def _to_host(value) -> np.ndarray:
    return value.get() if hasattr(value, "get") else value.numpy()


def _cupy_view(value):
    """A CuPy array over a device OrtValue's buffer (no copy; the OrtValue owns it)."""
    import cupy as cp

    dtype = helper.tensor_dtype_to_np_dtype(getattr(onnx.TensorProto, value.data_type()[7:-1].upper()))
    shape = tuple(value.shape())
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    mem = cp.cuda.UnownedMemory(value.data_ptr(), size, value)
    return cp.ndarray(shape, dtype=dtype, memptr=cp.cuda.MemoryPointer(mem, 0))


def cupy_kernel(rotate_kernel: str | None = None) -> Kernel:
    """The fused CUDA kernel, one :class:`~torq_onnx.runtime_ops.cuda.RotateQuantizer` (its
    matrices uploaded once) per site; takes an OrtValue or CuPy array, returns CuPy.
    ``rotate_kernel``: a key of ``cuda.ROTATE_KERNELS`` (default ``cuda.DEFAULT_ROTATE_KERNEL``)."""
    from torq_onnx.runtime_ops import cuda

    quantizers: dict[int, cuda.RotateQuantizer] = {}

    def run(x, op: OnlineOp):
        if id(op) not in quantizers:
            quantizers[id(op)] = cuda.RotateQuantizer(op.r_inter, op.r_intra, op.scale_rule,
                                                      rotate_kernel or cuda.DEFAULT_ROTATE_KERNEL)
        return quantizers[id(op)](x if hasattr(x, "get") else _cupy_view(x))

    return run
