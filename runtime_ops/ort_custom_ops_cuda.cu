// CUDA side of the ORT custom-op library (ort_custom_ops.cc): TorqRotateQuantize on the
// CUDA execution provider's stream. A non-identity R_inter is one group-mixing kernel (the
// fmaf chain of mxfp4_math.cuh's torq_group_mix_element, as the CPU kernel computes it);
// R_intra and the quantizer are one fused kernel of mxfp4_quant.cu, launched with the shape
// torq_onnx.runtime_ops.cuda.ROTATE_KERNELS gives it (passed in as -D definitions by the
// build, so Python and C++ share one launch geometry). float16 tensors are converted to and
// from float32 around it.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstring>

#include "mxfp4_quant.cu"
#include "ort_custom_ops.h"

#if !defined(TORQ_ROTATE_KERNEL) || !defined(TORQ_ROTATE_THREADS) || !defined(TORQ_ROTATE_BLOCKS_PER_CTA) || \
    !defined(TORQ_ROTATE_ROWS_PER_CTA) || !defined(TORQ_MAX_GRID_Y)
#error "build with the launch geometry of runtime_ops/cuda.py (torq_onnx.runtime_ops.compiled passes it)"
#endif

namespace {

// x viewed as [rows, G, W]: out[n, g, k] = sum_h R[g][h] x[n, h, k], one thread an element.
__global__ void torq_group_mix(const float* __restrict__ x, const float* __restrict__ r, float* __restrict__ out,
                               long long total, long long groups, long long width) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const long long d = groups * width, n = i / d, g = (i % d) / width, k = i % width;
    out[i] = torq_group_mix_element(r + g * groups, x + n * d + k, groups, width);
}

__global__ void torq_half_to_float(const __half* __restrict__ in, float* __restrict__ out, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = __half2float(in[i]);
}

__global__ void torq_float_to_half(const float* __restrict__ in, __half* __restrict__ out, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = __float2half_rn(in[i]);  // round to nearest even, as numpy's astype
}

unsigned grid_1d(long long n, int threads) { return (unsigned)((n + threads - 1) / threads); }

}  // namespace

struct TorqCudaState {
    float* r_inter = nullptr;  // device copy of the node's R_inter
    float* r_inter_host = nullptr;  // what it was copied from, to notice a changed input
    long long r_inter_size = 0;
    float* scratch = nullptr;  // float32 working buffers: [x | y | quantized y of TorqRotate], as needed
    size_t scratch_bytes = 0;
};

extern "C" TorqCudaState* torq_cuda_state_new(void) { return new TorqCudaState(); }

extern "C" void torq_cuda_state_free(TorqCudaState* s) {
    if (s == nullptr) return;
    cudaFree(s->r_inter);
    cudaFree(s->scratch);
    delete[] s->r_inter_host;
    delete s;
}

static const char* check(cudaError_t err) { return err == cudaSuccess ? nullptr : cudaGetErrorString(err); }

#define TORQ_CUDA_TRY(call)                              \
    do {                                                 \
        if (const char* torq_err_ = check(call)) return torq_err_; \
    } while (0)

// The node's R_inter on the device, uploaded again only when the host values change.
static const char* upload_r_inter(TorqCudaState* s, cudaStream_t stream, const float* host, long long size) {
    if (s->r_inter_size == size && std::memcmp(s->r_inter_host, host, size * sizeof(float)) == 0) return nullptr;
    TORQ_CUDA_TRY(cudaStreamSynchronize(stream));  // an earlier launch may still read the old copy
    cudaFree(s->r_inter);
    delete[] s->r_inter_host;
    s->r_inter_size = 0;
    s->r_inter_host = new float[size];
    std::memcpy(s->r_inter_host, host, size * sizeof(float));
    TORQ_CUDA_TRY(cudaMalloc(&s->r_inter, size * sizeof(float)));
    TORQ_CUDA_TRY(cudaMemcpyAsync(s->r_inter, host, size * sizeof(float), cudaMemcpyHostToDevice, stream));
    s->r_inter_size = size;
    return nullptr;
}

static const char* reserve_scratch(TorqCudaState* s, cudaStream_t stream, size_t bytes) {
    if (s->scratch_bytes >= bytes) return nullptr;
    TORQ_CUDA_TRY(cudaStreamSynchronize(stream));
    cudaFree(s->scratch);
    s->scratch = nullptr;
    s->scratch_bytes = 0;
    TORQ_CUDA_TRY(cudaMalloc(&s->scratch, bytes));
    s->scratch_bytes = bytes;
    return nullptr;
}

extern "C" const char* torq_cuda_rotate_quantize(TorqCudaState* s, void* stream_ptr, const void* x, void* y, const float* r_inter,
                                                 const float* r_intra, const TorqOpShape* shape, bool quantize, float bump) {
    cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
    const long long d = shape->blocks * 32, total = shape->rows * d;
    const bool mix = !torq_inter_is_identity(r_inter, shape->groups);
    const int threads = 256;
    // float32 views of x (input of the fused kernel) and y (its output: the quantized values,
    // or for TorqRotate the rotated ones, z_out, while the quantized ones go to scratch)
    const size_t x_bytes = (mix || shape->half) ? total * sizeof(float) : 0;
    const size_t y_bytes = shape->half ? total * sizeof(float) : 0;
    const size_t q_bytes = quantize ? 0 : total * sizeof(float);
    if (const char* err = reserve_scratch(s, stream, x_bytes + y_bytes + q_bytes)) return err;
    float* xf = x_bytes ? s->scratch : const_cast<float*>(static_cast<const float*>(x));
    float* yf = y_bytes ? s->scratch + (x_bytes / sizeof(float)) : static_cast<float*>(y);
    float* qf = quantize ? yf : s->scratch + ((x_bytes + y_bytes) / sizeof(float));  // the kernel's quantized output
    float* zf = quantize ? nullptr : yf;  // its rotated output
    // float16 x is widened into xf, or, when R_inter follows, into y's float32 buffer (free until
    // the fused kernel writes it), so the mixing reads one buffer and writes xf
    const float* src = static_cast<const float*>(x);
    if (shape->half) {
        float* widened = mix ? yf : xf;
        torq_half_to_float<<<grid_1d(total, threads), threads, 0, stream>>>(static_cast<const __half*>(x), widened, total);
        src = widened;
    }
    if (mix) {
        if (const char* err = upload_r_inter(s, stream, r_inter, shape->groups * shape->groups)) return err;
        torq_group_mix<<<grid_1d(total, threads), threads, 0, stream>>>(src, s->r_inter, xf, total, shape->groups, d / shape->groups);
    }
    // the fused kernel, in launches of at most TORQ_MAX_GRID_Y row tiles (cuda.rotate_launches)
    const long long chunk = (long long)TORQ_MAX_GRID_Y * TORQ_ROTATE_ROWS_PER_CTA;
    const unsigned grid_x = (unsigned)((shape->blocks + TORQ_ROTATE_BLOCKS_PER_CTA - 1) / TORQ_ROTATE_BLOCKS_PER_CTA);
    for (long long r0 = 0; r0 < shape->rows; r0 += chunk) {
        const long long n = shape->rows - r0 < chunk ? shape->rows - r0 : chunk;
        const dim3 grid(grid_x, (unsigned)((n + TORQ_ROTATE_ROWS_PER_CTA - 1) / TORQ_ROTATE_ROWS_PER_CTA));
        TORQ_ROTATE_KERNEL<<<grid, TORQ_ROTATE_THREADS, 0, stream>>>(xf + r0 * d, r_intra, qf + r0 * d, zf ? zf + r0 * d : nullptr,
                                                                    n, (int)shape->blocks, shape->r_stride, bump);
    }
    if (shape->half)
        torq_float_to_half<<<grid_1d(total, threads), threads, 0, stream>>>(yf, static_cast<__half*>(y), total);
    return check(cudaGetLastError());
}
