// CUDA side of the ORT custom-op library (ort_custom_ops.cc): TorqRotateQuantize on the
// CUDA execution provider's stream. A non-identity R_inter is mxfp4_quant.cu's group-mixing
// kernel (the fmaf chain of mxfp4_math.cuh's torq_group_mix_element, as the CPU kernel computes
// it); R_intra and the quantizer are one fused kernel of mxfp4_quant.cu, launched with the shape
// torq_onnx.runtime_ops.cuda.ROTATE_KERNELS gives it (passed in as -D definitions by the
// build, so Python and C++ share one launch geometry). float16 tensors are converted to and
// from float32 around it.
//
// ORT may run one session from several threads at once, so a node's kernel keeps no working
// memory between calls: each call's float32 buffers come from ORT's allocator on the call's
// stream (the caller passes them in), and the only state, the device copy of a constant
// R_inter, is written once under a lock and never changed.
//
// tests/simt compiles this file unchanged on the host, with an emulated CUDA runtime
// (tests/simt/cuda_shim) that defines TORQ_LAUNCH as a launch on its thread emulator.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstring>
#include <mutex>
#include <vector>

#include "mxfp4_quant.cu"
#include "ort_custom_ops.h"

#if !defined(TORQ_ROTATE_KERNEL) || !defined(TORQ_ROTATE_THREADS) || !defined(TORQ_ROTATE_BLOCKS_PER_CTA) || \
    !defined(TORQ_ROTATE_ROWS_PER_CTA) || !defined(TORQ_MAX_GRID_Y)
#error "build with the launch geometry of runtime_ops/cuda.py (torq_onnx.runtime_ops.compiled passes it)"
#endif

#ifndef TORQ_LAUNCH
#define TORQ_LAUNCH(kernel, grid, block, stream) kernel<<<(grid), (block), 0, (stream)>>>
#endif

namespace {

__global__ void torq_half_to_float(const __half* __restrict__ in, float* __restrict__ out, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = __half2float(in[i]);
}

__global__ void torq_float_to_half(const float* __restrict__ in, __half* __restrict__ out, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = __float2half_rn(in[i]);  // round to nearest even, as numpy's astype
}

constexpr int kThreads = 256;  // the element-wise kernels' CTA size

unsigned grid_1d(long long n) { return (unsigned)((n + kThreads - 1) / kThreads); }

const char* check(cudaError_t err) { return err == cudaSuccess ? nullptr : cudaGetErrorString(err); }

// Where one call's float32 buffers lie in its scratch memory (offsets in floats; -1: not needed).
struct ScratchLayout {
    long long x = -1;        // the fused kernel's input: widened float16 x, or x mixed by R_inter
    long long y = -1;        // its float32 output, for float16 y
    long long q = -1;        // TorqRotate: the quantized values the fused kernel also writes
    long long r_inter = -1;  // R_inter's values, when they differ from the node's device copy
    long long floats = 0;
};

ScratchLayout scratch_layout(const TorqOpShape& s, bool quantize, bool mix) {
    const long long total = s.rows * s.blocks * 32;
    ScratchLayout l;
    auto take = [&l](long long n) { const long long at = l.floats; l.floats += n; return at; };
    if (mix || s.half) l.x = take(total);
    if (s.half) l.y = take(total);
    if (!quantize) l.q = take(total);
    if (mix) l.r_inter = take(s.groups * s.groups);
    return l;
}

}  // namespace

struct TorqCudaState {
    std::mutex lock;                  // guards the two fields below
    std::vector<float> r_inter_host;  // the values of the device copy
    float* r_inter = nullptr;         // R_inter on the device, made by the node's first call; then fixed
};

extern "C" TorqCudaState* torq_cuda_state_new(void) { return new TorqCudaState(); }

extern "C" void torq_cuda_state_free(TorqCudaState* s) {
    if (s == nullptr) return;
    cudaFree(s->r_inter);
    delete s;
}

extern "C" size_t torq_cuda_scratch_bytes(const TorqOpShape* shape, const float* r_inter, bool quantize) {
    return (size_t)scratch_layout(*shape, quantize, !torq_inter_is_identity(r_inter, shape->groups)).floats * sizeof(float);
}

#define TORQ_CUDA_TRY(call)                                        \
    do {                                                           \
        if (const char* torq_err_ = check(call)) return torq_err_; \
    } while (0)

// R_inter on the device. The node's first call copies it once (synchronously: the copy is
// complete for every stream); R_inter is an initializer in an export, so later calls find the
// same values. Values that differ (R_inter fed as a graph input) go to this call's `spare`
// buffer on its stream instead, leaving the shared copy as other calls may be reading it.
static const char* device_r_inter(TorqCudaState* s, cudaStream_t stream, const float* host, long long size, float* spare,
                                  const float** out) {
    const size_t bytes = (size_t)size * sizeof(float);
    {
        std::lock_guard<std::mutex> guard(s->lock);
        if (s->r_inter == nullptr) {
            float* dev = nullptr;
            TORQ_CUDA_TRY(cudaMalloc(&dev, bytes));
            if (const char* err = check(cudaMemcpy(dev, host, bytes, cudaMemcpyHostToDevice))) {
                cudaFree(dev);
                return err;
            }
            s->r_inter = dev;
            s->r_inter_host.assign(host, host + size);
        }
        if ((long long)s->r_inter_host.size() == size && std::memcmp(s->r_inter_host.data(), host, bytes) == 0) {
            *out = s->r_inter;
            return nullptr;
        }
    }
    // a pageable source is staged before cudaMemcpyAsync returns, so `host` may change after
    TORQ_CUDA_TRY(cudaMemcpyAsync(spare, host, bytes, cudaMemcpyHostToDevice, stream));
    *out = spare;
    return nullptr;
}

extern "C" const char* torq_cuda_rotate_quantize(TorqCudaState* s, void* stream_ptr, const void* x, void* y, const float* r_inter,
                                                 const float* r_intra, const TorqOpShape* shape, bool quantize, float bump,
                                                 void* scratch_ptr) {
    cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
    const long long d = shape->blocks * 32, total = shape->rows * d;
    const bool mix = !torq_inter_is_identity(r_inter, shape->groups);
    const ScratchLayout l = scratch_layout(*shape, quantize, mix);
    float* scratch = static_cast<float*>(scratch_ptr);
    // float32 views of x (input of the fused kernel) and y (its output: the quantized values,
    // or for TorqRotate the rotated ones, z, while the quantized ones go to scratch)
    float* xf = l.x >= 0 ? scratch + l.x : const_cast<float*>(static_cast<const float*>(x));
    float* yf = l.y >= 0 ? scratch + l.y : static_cast<float*>(y);
    float* qf = quantize ? yf : scratch + l.q;  // the fused kernel's quantized output
    float* zf = quantize ? nullptr : yf;        // its rotated output
    // float16 x is widened into xf, or, when R_inter follows, into y's float32 buffer (free until
    // the fused kernel writes it), so the mixing reads one buffer and writes xf
    const float* src = static_cast<const float*>(x);
    if (shape->half) {
        float* widened = mix ? yf : xf;
        TORQ_LAUNCH(torq_half_to_float, grid_1d(total), kThreads, stream)(static_cast<const __half*>(x), widened, total);
        src = widened;
    }
    if (mix) {
        const float* r_dev = nullptr;
        if (const char* err = device_r_inter(s, stream, r_inter, shape->groups * shape->groups, scratch + l.r_inter, &r_dev))
            return err;
        const long long width = d / shape->groups, columns = shape->rows * width;
        const long long row_tiles = (shape->groups + TORQ_MIX_WARPS * TORQ_MIX_ROWS - 1) / (TORQ_MIX_WARPS * TORQ_MIX_ROWS);
        if (row_tiles > TORQ_MAX_GRID_Y) return "R_inter has too many groups for the group-mixing kernel's grid";
        const dim3 grid((unsigned)((columns + 31) / 32), (unsigned)row_tiles);
        TORQ_LAUNCH(torq_group_mix, grid, TORQ_MIX_WARPS * 32, stream)(src, r_dev, xf, columns, shape->groups, width);
    }
    // the fused kernel, in launches of at most TORQ_MAX_GRID_Y row tiles (cuda.rotate_launches)
    const long long chunk = (long long)TORQ_MAX_GRID_Y * TORQ_ROTATE_ROWS_PER_CTA;
    const unsigned grid_x = (unsigned)((shape->blocks + TORQ_ROTATE_BLOCKS_PER_CTA - 1) / TORQ_ROTATE_BLOCKS_PER_CTA);
    for (long long r0 = 0; r0 < shape->rows; r0 += chunk) {
        const long long n = shape->rows - r0 < chunk ? shape->rows - r0 : chunk;
        const dim3 grid(grid_x, (unsigned)((n + TORQ_ROTATE_ROWS_PER_CTA - 1) / TORQ_ROTATE_ROWS_PER_CTA));
        TORQ_LAUNCH(TORQ_ROTATE_KERNEL, grid, TORQ_ROTATE_THREADS, stream)(xf + r0 * d, r_intra, qf + r0 * d, zf ? zf + r0 * d : nullptr,
                                                                           n, (int)shape->blocks, shape->r_stride, bump);
    }
    if (shape->half) TORQ_LAUNCH(torq_float_to_half, grid_1d(total), kThreads, stream)(yf, static_cast<__half*>(y), total);
    return check(cudaGetLastError());
}
