// ONNX Runtime custom-op library: ai.torq::TorqRotateQuantize as a compiled kernel.
//
// A model's TorqRotateQuantize nodes carry their ONNX function body; ORT prefers a kernel
// registered for the same domain and name, so a session that loads this library runs the
// whole graph with the op compiled: one ORT run per forward pass, on CPU and (built with
// TORQ_ORTOPS_CUDA) on the CUDA execution provider, where the op launches the fused CUDA
// kernels of mxfp4_quant.cu on ORT's own stream.
//
// Arithmetic (the contract the tests check): per token, y = MXFP4(R_inter X R_intra) with
//  - R_inter [G, G] mixing the G equal groups of the hidden axis as fmaf chains over the
//    group index h in ascending order, skipped for [[1]] (the identity as exported);
//  - R_intra [32, 32] (shared) or [B, 32, 32] (per block) as fmaf chains over the input
//    element i in ascending order, starting from 0: the order both fused CUDA kernels use;
//  - the per-block quantizer of mxfp4_math.cuh (bit-exact to torq_onnx.mxfp4).
// The CPU and CUDA kernels therefore compute the same bits; ORT's MatMul-based function
// body differs from them only in GEMM summation order.
//
// Only the ORT C API is used, requested at version TORQ_ORT_API (1.20, the oldest
// onnxruntime torq-onnx supports), so one build loads in any newer ORT.
#include <math.h>

#include <cstdarg>
#include <cstdio>
#include <algorithm>
#include <cstring>
#include <vector>

#ifndef __CUDACC__  // host C++: the shared arithmetic is plain inline code
#define __host__
#define __device__
#endif
#include "mxfp4_math.cuh"
#include "onnxruntime_c_api.h"
#include "ort_custom_ops.h"

#define TORQ_ORT_API 20

namespace {

const OrtApi* api = nullptr;
const char* const kDomain = "ai.torq";
const char* const kQuantizeOp = "TorqRotateQuantize";  // y = MXFP4(R_inter X R_intra)
const char* const kRotateOp = "TorqRotate";  // y = R_inter X R_intra (A16 exports), same chains

OrtStatus* fail(OrtErrorCode code, const char* fmt, ...) {
    char msg[512];
    va_list args;
    va_start(args, fmt);
    std::vsnprintf(msg, sizeof msg, fmt, args);
    va_end(args);
    return api->CreateStatus(code, msg);
}

#define TORQ_TRY(call)                                \
    do {                                              \
        if (OrtStatus* torq_status_ = (call)) return torq_status_; \
    } while (0)

// Element type and dimensions of one input or output.
struct TensorInfo {
    ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    std::vector<int64_t> dims;
    int64_t count() const {
        int64_t n = 1;
        for (int64_t d : dims) n *= d;
        return n;
    }
};

OrtStatus* describe(const OrtValue* value, TensorInfo* out) {
    OrtTensorTypeAndShapeInfo* info = nullptr;
    TORQ_TRY(api->GetTensorTypeAndShape(value, &info));
    size_t rank = 0;
    OrtStatus* status = api->GetTensorElementType(info, &out->type);
    if (!status) status = api->GetDimensionsCount(info, &rank);
    if (!status) {
        out->dims.resize(rank);
        status = api->GetDimensions(info, out->dims.data(), rank);
    }
    api->ReleaseTensorTypeAndShapeInfo(info);
    return status;
}

// The validated geometry of one call, shared by the CPU and CUDA kernels.
OrtStatus* check_call(const char* op, const TensorInfo& x, const TensorInfo& r_inter, const TensorInfo& r_intra, TorqOpShape* shape) {
    if (x.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && x.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16)
        return fail(ORT_INVALID_ARGUMENT, "%s: x must be float32 or float16 (element type %d)", op, (int)x.type);
    if (x.dims.empty() || x.dims.back() % 32 != 0)
        return fail(ORT_INVALID_ARGUMENT, "%s: the last axis of x (%lld) is not a multiple of 32", op,
                    x.dims.empty() ? 0LL : (long long)x.dims.back());
    if (r_inter.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || r_intra.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
        return fail(ORT_INVALID_ARGUMENT, "%s: r_inter and r_intra must be float32", op);
    const int64_t d = x.dims.back(), blocks = d / 32;
    if (r_inter.dims.size() != 2 || r_inter.dims[0] != r_inter.dims[1] || r_inter.dims[0] < 1 || d % r_inter.dims[0] != 0)
        return fail(ORT_INVALID_ARGUMENT, "%s: r_inter must be [G, G] with G dividing the hidden size %lld", op, (long long)d);
    const bool shared = r_intra.dims.size() == 2 && r_intra.dims[0] == 32 && r_intra.dims[1] == 32;
    const bool per_block = r_intra.dims.size() == 3 && r_intra.dims[0] == blocks && r_intra.dims[1] == 32 && r_intra.dims[2] == 32;
    if (!shared && !per_block)
        return fail(ORT_INVALID_ARGUMENT, "%s: r_intra must be [32, 32] or [%lld, 32, 32]", op, (long long)blocks);
    shape->rows = x.count() / d;
    shape->blocks = blocks;
    shape->groups = r_inter.dims[0];
    shape->r_stride = per_block ? 1024 : 0;
    shape->half = x.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    return nullptr;
}

// One node of either op: its scale rule, whether it quantizes, and (CUDA) its device state.
struct Kernel {
    const char* op;
    bool quantize;
    float bump;
#ifdef TORQ_ORTOPS_CUDA
    TorqCudaState* cuda = nullptr;
#endif
};

// One compute call: the inputs' data, the output (shaped like x) and the geometry.
struct Call {
    const OrtValue* x_value;  // x itself, for its memory info
    const void* x;
    const float* r_inter;
    const float* r_intra;
    void* y;
    TorqOpShape shape;
};

template <class T>
OrtStatus* data(const OrtValue* value, T** out) {
    void* p = nullptr;
    TORQ_TRY(api->GetTensorMutableData(const_cast<OrtValue*>(value), &p));
    *out = static_cast<T*>(p);
    return nullptr;
}

OrtStatus* open_call(const Kernel& k, OrtKernelContext* ctx, Call* call) {
    const OrtValue *x, *ri, *rk;
    TORQ_TRY(api->KernelContext_GetInput(ctx, 0, &x));
    call->x_value = x;
    TORQ_TRY(api->KernelContext_GetInput(ctx, 1, &ri));
    TORQ_TRY(api->KernelContext_GetInput(ctx, 2, &rk));
    TensorInfo xi, rii, rki;
    TORQ_TRY(describe(x, &xi));
    TORQ_TRY(describe(ri, &rii));
    TORQ_TRY(describe(rk, &rki));
    TORQ_TRY(check_call(k.op, xi, rii, rki, &call->shape));
    OrtValue* y = nullptr;
    TORQ_TRY(api->KernelContext_GetOutput(ctx, 0, xi.dims.data(), xi.dims.size(), &y));
    TORQ_TRY(data(x, const_cast<void**>(&call->x)));
    TORQ_TRY(data(ri, const_cast<float**>(&call->r_inter)));
    TORQ_TRY(data(rk, const_cast<float**>(&call->r_intra)));
    return data(y, &call->y);
}

template <bool Quantize>
OrtStatus* create_kernel(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info, void** out) {
    float bump = 0.f;
    if (Quantize) TORQ_TRY(api->KernelInfoGetAttribute_float(info, "bump_threshold", &bump));
    Kernel* k = new Kernel{Quantize ? kQuantizeOp : kRotateOp, Quantize, bump};
#ifdef TORQ_ORTOPS_CUDA
    k->cuda = torq_cuda_state_new();
#endif
    *out = k;
    return nullptr;
}

void destroy_kernel(void* kernel) {
    Kernel* k = static_cast<Kernel*>(kernel);
#ifdef TORQ_ORTOPS_CUDA
    torq_cuda_state_free(k->cuda);
#endif
    delete k;
}

// ---------------------------------------------------------------- CPU kernel

struct CpuJob {
    Call call;
    const Kernel* kernel;
    int64_t rows_per_task;
};

// R_inter's mixing of one token: torq_group_mix_element's chain for every k at once (h
// outer, k inner, so it vectorizes). Groups of 32 (a [B, B] R_inter) keep two groups' sums in
// local arrays, which stay in registers, and read each x block once for both.
void mix_token(const float* v, const float* r, int64_t groups, int64_t width, float* out) {
    int64_t g = 0;
    if (width == 32) {
        for (; g + 1 < groups; g += 2) {
            float a0[32] = {}, a1[32] = {};
            const float *r0 = r + g * groups, *r1 = r0 + groups;
            for (int64_t h = 0; h < groups; ++h) {
                const float c0 = r0[h], c1 = r1[h], *xh = v + h * 32;
                for (int k = 0; k < 32; ++k) {
                    a0[k] = fmaf(c0, xh[k], a0[k]);
                    a1[k] = fmaf(c1, xh[k], a1[k]);
                }
            }
            std::memcpy(out + g * 32, a0, sizeof a0);
            std::memcpy(out + (g + 1) * 32, a1, sizeof a1);
        }
    }
    for (; g < groups; ++g) {
        float* acc = out + g * width;
        std::fill(acc, acc + width, 0.f);
        for (int64_t h = 0; h < groups; ++h) {
            const float c0 = r[g * groups + h], *xh = v + h * width;
            for (int64_t k = 0; k < width; ++k) acc[k] = fmaf(c0, xh[k], acc[k]);
        }
    }
}

void cpu_rows(void* user, size_t task) {
    const CpuJob& job = *static_cast<const CpuJob*>(user);
    const Call& c = job.call;
    const TorqOpShape& s = c.shape;
    const int64_t d = s.blocks * 32, first = (int64_t)task * job.rows_per_task;
    const int64_t last = first + job.rows_per_task < s.rows ? first + job.rows_per_task : s.rows;
    const bool mix = !torq_inter_is_identity(c.r_inter, s.groups);
    std::vector<float> widened(s.half ? d : 0), mixed(mix ? d : 0);
    for (int64_t n = first; n < last; ++n) {
        const float* v = static_cast<const float*>(c.x) + n * d;  // float32 x is read in place
        if (s.half) {
            const _Float16* xh = static_cast<const _Float16*>(c.x) + n * d;
            for (int64_t k = 0; k < d; ++k) widened[k] = (float)xh[k];
            v = widened.data();
        }
        if (mix) {
            mix_token(v, c.r_inter, s.groups, d / s.groups, mixed.data());
            v = mixed.data();
        }
        for (int64_t b = 0; b < s.blocks; ++b) {
            float z[32], q[32];
            torq_block_rotate(v + b * 32, c.r_intra + b * s.r_stride, z);
            const float* out = z;
            if (job.kernel->quantize) {
                torq_mxfp4_block(z, q, job.kernel->bump);
                out = q;
            }
            if (s.half) {
                _Float16* yh = static_cast<_Float16*>(c.y) + n * d + b * 32;
                for (int j = 0; j < 32; ++j) yh[j] = (_Float16)out[j];  // round to nearest even, as numpy's astype
            } else {
                std::memcpy(static_cast<float*>(c.y) + n * d + b * 32, out, 32 * sizeof(float));
            }
        }
    }
}

OrtStatus* compute_cpu(void* kernel, OrtKernelContext* ctx) {
    CpuJob job{};
    job.kernel = static_cast<const Kernel*>(kernel);
    TORQ_TRY(open_call(*job.kernel, ctx, &job.call));
    const TorqOpShape& s = job.call.shape;
    if (s.rows == 0) return nullptr;
    // about 64k elements a task: enough work per task for ORT's thread pool to pay off
    const int64_t d = s.blocks * 32;
    job.rows_per_task = (65536 + d - 1) / d;
    const size_t tasks = (size_t)((s.rows + job.rows_per_task - 1) / job.rows_per_task);
    return api->KernelContext_ParallelFor(ctx, cpu_rows, tasks, 0, &job);
}

#ifdef TORQ_ORTOPS_CUDA
// ---------------------------------------------------------------- CUDA kernel

OrtStatus* compute_cuda(void* kernel, OrtKernelContext* ctx) {
    const Kernel& k = *static_cast<const Kernel*>(kernel);
    Call call;  // x, y, r_intra: device memory; r_inter: host (GetInputMemoryType), so [[1]] needs no device read
    TORQ_TRY(open_call(k, ctx, &call));
    if (call.shape.rows == 0) return nullptr;
    void* stream = nullptr;
    TORQ_TRY(api->KernelContext_GetGPUComputeStream(ctx, &stream));
    // working memory from ORT's allocator for x's device, tied to this call's stream: freed when
    // the call returns, as ORT's own CUDA kernels free theirs, and reused only in stream order
    const size_t bytes = torq_cuda_scratch_bytes(&call.shape, call.r_inter, k.quantize);
    void* scratch = nullptr;
    OrtAllocator* allocator = nullptr;
    if (bytes > 0) {
        const OrtMemoryInfo* memory = nullptr;
        TORQ_TRY(api->GetTensorMemoryInfo(call.x_value, &memory));
        TORQ_TRY(api->KernelContext_GetAllocator(ctx, memory, &allocator));
        if (OrtStatus* status = api->KernelContext_GetScratchBuffer(ctx, memory, bytes, &scratch)) {
            api->ReleaseAllocator(allocator);
            return status;
        }
    }
    const char* err = torq_cuda_rotate_quantize(k.cuda, stream, call.x, call.y, call.r_inter, call.r_intra, &call.shape,
                                                k.quantize, k.bump, scratch);
    if (allocator != nullptr) {
        allocator->Free(allocator, scratch);
        api->ReleaseAllocator(allocator);
    }
    return err ? fail(ORT_RUNTIME_EXCEPTION, "%s (CUDA): %s", k.op, err) : nullptr;
}
#endif

// ---------------------------------------------------------------- op descriptions

// y has x's element type and shape.
OrtStatus* infer_shape(const OrtCustomOp*, OrtShapeInferContext* ctx) {
    OrtTensorTypeAndShapeInfo* in = nullptr;  // owned by the context (releasing it is a double free)
    TORQ_TRY(api->ShapeInferContext_GetInputTypeShape(ctx, 0, &in));
    ONNXTensorElementDataType type;
    size_t rank = 0;
    TORQ_TRY(api->GetTensorElementType(in, &type));
    TORQ_TRY(api->GetDimensionsCount(in, &rank));
    // x's rank is at least 1 (its last axis holds the blocks), so rank 0 here is a shape the
    // graph does not know; leave y's unset too rather than declare it a scalar
    if (rank == 0) return nullptr;
    std::vector<int64_t> dims(rank);
    std::vector<const char*> names(rank);
    TORQ_TRY(api->GetDimensions(in, dims.data(), rank));
    TORQ_TRY(api->GetSymbolicDimensions(in, names.data(), rank));
    for (size_t i = 0; i < rank; ++i)  // an unknown, unnamed dim would be set as the value -1
        if (dims[i] < 0 && (names[i] == nullptr || names[i][0] == '\0')) return nullptr;
    OrtTensorTypeAndShapeInfo* out = nullptr;
    TORQ_TRY(api->CreateTensorTypeAndShapeInfo(&out));
    OrtStatus* status = api->SetTensorElementType(out, type);
    if (!status) status = api->SetDimensions(out, dims.data(), rank);
    if (!status) status = api->SetSymbolicDimensions(out, names.data(), rank);
    if (!status) status = api->ShapeInferContext_SetOutputTypeShape(ctx, 0, out);
    api->ReleaseTensorTypeAndShapeInfo(out);
    return status;
}

// Both ops: x [..., D] float32 or float16 (checked per call), r_inter and r_intra float32,
// y like x. `Cuda` selects the execution provider and where r_inter is read.
template <bool Quantize, bool Cuda>
OrtCustomOp make_op() {
    OrtCustomOp op;
    std::memset(&op, 0, sizeof op);
    op.version = TORQ_ORT_API;
    op.GetName = [](const OrtCustomOp*) { return Quantize ? kQuantizeOp : kRotateOp; };
    op.GetExecutionProviderType = [](const OrtCustomOp*) -> const char* { return Cuda ? "CUDAExecutionProvider" : nullptr; };
    op.GetInputType = [](const OrtCustomOp*, size_t i) {
        return i == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    };
    op.GetInputTypeCount = [](const OrtCustomOp*) -> size_t { return 3; };
    op.GetOutputType = [](const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; };
    op.GetOutputTypeCount = [](const OrtCustomOp*) -> size_t { return 1; };
    op.GetInputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
    op.GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
    op.GetInputMemoryType = [](const OrtCustomOp*, size_t i) { return Cuda && i == 1 ? OrtMemTypeCPUInput : OrtMemTypeDefault; };
    op.CreateKernelV2 = create_kernel<Quantize>;
#ifdef TORQ_ORTOPS_CUDA
    op.KernelComputeV2 = Cuda ? compute_cuda : compute_cpu;
#else
    op.KernelComputeV2 = compute_cpu;
#endif
    op.KernelDestroy = destroy_kernel;
    op.InferOutputShapeFn = infer_shape;
    op.GetStartVersion = [](const OrtCustomOp*) { return 1; };
    op.GetEndVersion = [](const OrtCustomOp*) { return 1; };
    return op;
}

#ifdef TORQ_ORTOPS_CUDA
OrtCustomOp ops[] = {make_op<true, false>(), make_op<false, false>(), make_op<true, true>(), make_op<false, true>()};
#else
OrtCustomOp ops[] = {make_op<true, false>(), make_op<false, false>()};
#endif

}  // namespace

extern "C" ORT_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* base) {
    api = base->GetApi(TORQ_ORT_API);
    if (api == nullptr)  // an ORT older than 1.20 has no API of that version; version 1's CreateStatus says so
        return base->GetApi(1)->CreateStatus(ORT_FAIL, "the torq custom ops need onnxruntime 1.20 or newer");
    OrtCustomOpDomain* domain = nullptr;
    TORQ_TRY(api->CreateCustomOpDomain(kDomain, &domain));
    for (OrtCustomOp& op : ops) TORQ_TRY(api->CustomOpDomain_Add(domain, &op));
    // the session options keep the domain: it must outlive every session made with them
    return api->AddCustomOpDomain(options, domain);
}
