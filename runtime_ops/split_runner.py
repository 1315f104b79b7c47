"""Run an exported torq model in ONNX Runtime with the online op computed outside ORT.

The graph is cut at every ``TorqRotateQuantize`` node into ORT sub-graphs ("segments",
:mod:`torq_onnx.runtime_ops.segments`); between two segments a pluggable *kernel* computes
the op. This is the route by which an ORT session with the CUDA execution provider runs
the CuPy kernel: segments run with IOBinding on device OrtValues, the kernel reads and
writes those same device buffers (zero copy, through their data pointers), and no value
goes to the host between segments. On CPU the same runner, with the numpy reference or the
op's own ONNX function as the kernel, checks that the splitting is exact.

Cost model: one ORT run per segment (sites + 1 per forward; for SmolLM2-135M 121 runs) and
one kernel launch (two GEMMs + the quantizer) per site. The per-run host overhead of ORT
(tens of microseconds) is paid once per segment, so this pays off when the fused kernel
saves more than that over the op's inlined ONNX function body. Since so many sessions
live in one process, their thread pools do not spin and, on CPU, they share one arena
(:func:`many_session_options`, :func:`share_arena`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from torq_onnx.errors import TorqError
from torq_onnx.runtime_ops.functions import IR_VERSION
from torq_onnx.runtime_ops.providers import require_installed, require_providers
from torq_onnx.runtime_ops.segments import OnlineOp, Segment, split_model

Kernel = Callable[[object, OnlineOp], object]
SPINNING_KEYS = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning")
USE_ENV_ALLOCATORS = "session.use_env_allocators"


def _set_unless_set(opts, key: str, value: str) -> None:
    try:
        opts.get_session_config_entry(key)
    except RuntimeError:  # not set by the caller
        opts.add_session_config_entry(key, value)


def share_arena(device: str = "cpu", device_id: int = 0) -> None:
    """Register an arena allocator in ORT's process-wide environment, shared by the sessions
    that opt in (``session.use_env_allocators``); calling it again does no harm. The arena
    and what it has grown to live as long as the process.

    A session per segment otherwise keeps an arena per segment, each grown to that
    segment's own peak: on SmolLM2-135M (512 tokens, CPU) the split run's peak RSS falls
    from 6.0 to 4.1 GB with one shared arena, logits unchanged (``tools/bench_split.py``).
    """
    import onnxruntime as ort

    kind = ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR
    if device == "cpu":
        ort.create_and_register_allocator(ort.OrtMemoryInfo("Cpu", kind, 0, ort.OrtMemType.DEFAULT), ort.OrtArenaCfg({}))
    else:
        ort.create_and_register_allocator_v2("CUDAExecutionProvider", ort.OrtMemoryInfo("Cuda", kind, device_id, ort.OrtMemType.DEFAULT),
                                             {"device_id": str(device_id)}, ort.OrtArenaCfg({}))


def many_session_options(sess_options=None, shared_arena: bool = True, device: str = "cpu", device_id: int = 0):
    """``register``'s options for one of the many small sessions a split run keeps.

    Each ORT session owns a thread pool whose idle workers spin for new work after every
    run; with a session per segment and per op, hundreds of spinning workers take the cores
    from the one that is working (see ``tools/bench_split.py``). So spinning is off unless
    ``sess_options`` sets it; idle workers then sleep and cost nothing. With
    ``shared_arena`` the sessions allocate from the environment's arena for ``device``,
    registered here (:func:`share_arena`).
    """
    from torq_onnx.runtime_ops import register

    opts = register(sess_options)
    for key in SPINNING_KEYS:
        _set_unless_set(opts, key, "0")
    if shared_arena:
        share_arena(device, device_id)
        _set_unless_set(opts, USE_ENV_ALLOCATORS, "1")
    return opts


def numpy_kernel(x: np.ndarray, op: OnlineOp) -> np.ndarray:
    """The numpy reference op (float32 GEMMs in numpy: agrees with ORT's up to summation order)."""
    from torq_onnx.runtime_ops.reference import rotate_quantize

    return rotate_quantize(x, op.r_inter, op.r_intra, op.scale_rule)


def ort_function_kernel(sess_options=None, shared_arena: bool = True) -> Kernel:
    """The op's own ONNX function in a one-node CPU session per site: the same arithmetic as
    the whole-graph session, so a split run with it is bit-identical to the unsplit one.
    ``sess_options`` and ``shared_arena`` as for :func:`many_session_options`."""
    import onnxruntime as ort

    from torq_onnx.runtime_ops.functions import attach_functions, make_rotate_quantize_node

    options = many_session_options(sess_options, shared_arena)
    sessions: dict[int, object] = {}

    def run(x: np.ndarray, op: OnlineOp) -> np.ndarray:
        if id(op) not in sessions:
            t = helper.np_dtype_to_tensor_dtype(x.dtype)
            node = make_rotate_quantize_node("x", "ri", "rk", "y", op.scale_rule)
            g = helper.make_graph([node], "op", [helper.make_tensor_value_info("x", t, None)], [helper.make_tensor_value_info("y", t, None)],
                                  [numpy_helper.from_array(op.r_inter.astype(np.float32), "ri"), numpy_helper.from_array(op.r_intra.astype(np.float32), "rk")])
            m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=IR_VERSION)
            attach_functions(m)
            sessions[id(op)] = ort.InferenceSession(m.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])
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
    ``device_id`` picks the GPU, for ORT and CuPy alike (:func:`cuda_scope`);
    ``cuda_options`` are further CUDA execution provider options (e.g. ``{"use_tf32": "0"}``).
    ``sess_options`` apply to every segment (see :func:`many_session_options`);
    ``shared_arena``: the segments allocate from one arena (:func:`share_arena`; default:
    on CPU, where it is measured; off on CUDA, where it has not run yet);
    ``recompute=False`` cuts in exported order without recomputing constant and shape
    values per segment (the baseline :mod:`~torq_onnx.runtime_ops.segments` improves on).
    ``io_binding=True`` runs CPU segments the CUDA way too (IOBinding, OrtValues between
    segments, kernel outputs bound by pointer), so CPU tests cover that code path.
    ``last_position_logits=True``: ``logits`` are the last position's only, as for
    :func:`~torq_onnx.runtime_ops.load_session` (generation's prefill).
    """

    def __init__(self, path_or_model, kernel: Kernel | None = None, device: str = "cpu", sess_options=None, device_id: int = 0,
                 cuda_options: dict | None = None, recompute: bool = True, shared_arena: bool | None = None,
                 io_binding: bool | None = None, last_position_logits: bool = False) -> None:
        import onnxruntime as ort

        if device not in ("cpu", "cuda"):
            raise TorqError(f"device must be 'cpu' or 'cuda', not {device!r}")
        if device == "cuda" and io_binding is False:
            raise TorqError("device='cuda' runs with IOBinding: io_binding=False is for CPU only")
        self.io_binding = device == "cuda" if io_binding is None else io_binding
        model = path_or_model if isinstance(path_or_model, onnx.ModelProto) else _read_model(path_or_model)
        if last_position_logits:
            from torq_onnx.last_logits import slice_logits_to_last_position  # imports runtime_ops: not at module level

            if model is path_or_model:  # the caller's proto stays as it is
                model, given = onnx.ModelProto(), model
                model.CopyFrom(given)
            slice_logits_to_last_position(model)
        self.device, self.device_id = device, device_id
        self.parts = split_model(model, recompute=recompute)
        self._inputs, self._outputs = _value_specs(model.graph.input), _value_specs(model.graph.output)
        self.outputs = [o.name for o in self._outputs]
        self._run_options = None
        if device == "cuda":
            require_installed(["CUDAExecutionProvider"], "the split model (device='cuda')")
            try:
                import cupy as cp
            except ImportError as exc:
                raise TorqError(f"device='cuda' runs the kernels through CuPy, which does not import here ({exc}): "
                                "install the gpu extra (pip install -e '.[gpu]', without the CPU onnxruntime)") from None
            with cp.cuda.Device(device_id):
                self.stream = cp.cuda.Stream(non_blocking=True)
            options = {**(cuda_options or {}), "device_id": device_id, "user_compute_stream": str(self.stream.ptr)}
            providers = [("CUDAExecutionProvider", options)]
            self._run_options = ort.RunOptions()
            self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        else:
            providers = ["CPUExecutionProvider"]
        shared_arena = device == "cpu" if shared_arena is None else shared_arena
        options = many_session_options(sess_options, shared_arena, device, device_id)
        for part in self.parts:
            if isinstance(part, Segment):
                part.session = ort.InferenceSession(part.model.SerializeToString(), sess_options=options, providers=providers)
                require_providers(part.session, providers, "a segment of the split model")
                part.model = None  # a second copy of its weights (on SmolLM2, 240 MB of a 1.76 GB RSS)
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
        if not self.io_binding:
            return self._forward(output_names, dict(feeds))
        with cuda_scope(self.device_id, self.stream) if self.device == "cuda" else contextlib.nullcontext():
            values = {k: self._to_device(v) for k, v in feeds.items()}
            bound_outs = self._forward(output_names, values)
            if self.device == "cuda":
                self.stream.synchronize()  # the one wait per forward pass
            return [_to_host(v) for v in bound_outs]

    def _forward(self, output_names: list[str] | None, values: dict) -> list:
        for part in self.parts:
            if isinstance(part, OnlineOp):
                x = values[part.x]
                if self.device == "cpu" and hasattr(x, "data_ptr"):  # a bound CPU run: kernels take numpy
                    x = x.numpy()
                values[part.y] = self.kernel(x, part)
                continue
            outs = self._run_segment(part, values)
            values.update(zip(part.outputs, outs))
            for v in part.drop_after:
                values.pop(v, None)
        return [values[n] for n in (output_names or self.outputs)]

    def _run_segment(self, seg: Segment, values: dict) -> list:
        if not self.io_binding:
            return seg.session.run(seg.outputs, {k: values[k] for k in seg.inputs})
        binding = seg.session.io_binding()
        for k in seg.inputs:
            v = values[k]
            if hasattr(v, "data_ptr"):  # an OrtValue from an earlier segment or the feeds
                binding.bind_ortvalue_input(k, v)
            else:  # a kernel output (CuPy, or numpy on CPU), bound by pointer; `values` keeps it alive
                if self.device == "cpu":
                    values[k] = v = np.ascontiguousarray(v)
                ptr = v.data.ptr if self.device == "cuda" else v.ctypes.data
                binding.bind_input(k, self.device, self.device_id, v.dtype.type, list(v.shape), ptr)
        for k in seg.outputs:
            binding.bind_output(k, self.device, self.device_id)
        seg.session.run_with_iobinding(binding, self._run_options)
        return binding.get_outputs()

    def _to_device(self, array: np.ndarray):
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, self.device_id)


@contextlib.contextmanager
def cuda_scope(device_id: int, stream):
    """Where a CUDA split run's CuPy work goes: GPU ``device_id`` made CuPy's current device
    (CuPy allocates, compiles and launches on the current one, and refuses to enter a stream
    made on another), then ``stream``, the one ORT runs on, made CuPy's current stream."""
    import cupy as cp

    with cp.cuda.Device(device_id), stream:
        yield


def _read_model(path) -> onnx.ModelProto:
    """The model at ``path`` with its external data, or a TorqError naming what is wrong (no
    file, not an ONNX model, external data that cannot be read)."""
    from torq_onnx.models import check_onnx_file  # imports runtime_ops: not at module level

    p = Path(path)
    if not p.is_file():
        raise TorqError(f"no ONNX model at {p}")
    model = check_onnx_file(p)
    try:
        onnx.load_external_data_for_model(model, str(p.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:  # onnx checks the data file is there
        raise TorqError(f"the external data of {p} could not be read: {exc}") from None
    return model


def _to_host(value) -> np.ndarray:
    if hasattr(value, "get"):  # CuPy
        return value.get()
    return value.numpy() if hasattr(value, "data_ptr") else np.asarray(value)


def _cupy_view(value):
    """A CuPy array over a device OrtValue's buffer (no copy; the OrtValue owns it)."""
    import cupy as cp

    dtype = helper.tensor_dtype_to_np_dtype(getattr(onnx.TensorProto, value.data_type()[7:-1].upper()))
    shape = tuple(value.shape())
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    mem = cp.cuda.UnownedMemory(value.data_ptr(), size, value)
    return cp.ndarray(shape, dtype=dtype, memptr=cp.cuda.MemoryPointer(mem, 0))


def cupy_kernel(rotate_kernel: str | None = None, mix: str | None = None) -> Kernel:
    """The fused CUDA kernel, one :class:`~torq_onnx.runtime_ops.cuda.RotateQuantizer` (its
    matrices uploaded once) per site; takes an OrtValue or CuPy array, returns CuPy.
    ``rotate_kernel``: a key of ``cuda.ROTATE_KERNELS`` (default ``cuda.DEFAULT_ROTATE_KERNEL``);
    ``mix``: how a dense ``R_inter`` is applied, a key of ``cuda.MIX_ROUTES`` (default
    ``cuda.DEFAULT_MIX_ROUTE``; ``"fmaf"`` gives the compiled library's bits)."""
    from torq_onnx.runtime_ops import cuda

    rotate_kernel = rotate_kernel or cuda.DEFAULT_ROTATE_KERNEL
    mix = cuda.mix_route(mix or cuda.DEFAULT_MIX_ROUTE)
    cuda.rotate_kernel(rotate_kernel)  # a bad name fails here, not at the first site
    quantizers: dict[int, cuda.RotateQuantizer] = {}

    def run(x, op: OnlineOp):
        if id(op) not in quantizers:
            quantizers[id(op)] = cuda.RotateQuantizer(op.r_inter, op.r_intra, op.scale_rule, rotate_kernel, mix)
        return quantizers[id(op)](x if hasattr(x, "get") else _cupy_view(x))

    return run
