// CUDA side of the ORT custom-op library (ort_custom_ops.cc): TorqRotateQuantize on the
// CUDA execution provider's stream. A non-identity R_inter is one group-mixing kernel (the
// fmaf chain of mxfp4_math.cuh's torq_group_mix_element, as the CPU kernel computes it);
// R_intra and the quantizer are one fused kernel of mxfp4_quant.cu, launched with the shape
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

// R_inter's mixing, a product out[n] = R X[n] per token with X[n] = x[n] viewed as [G, W]:
// out[n, g, k] = sum_h R[g][h] x[n, h, k], each sum the fmaf chain over h = 0, 1, ..., G-1 of
// mxfp4_math.cuh's torq_group_mix_element (the CPU library's order, so the bits are its bits).
// A "column" is one (n, k); a CTA computes kMixWarps x kMixRows consecutive g for 32
// consecutive columns, h in tiles of kMixChunk: the tile's x values (32 columns) and R values
// (the CTA's rows) are staged in shared memory once and each is read by many sums, a lane
// keeping kMixRows sums in registers. Per step h a lane issues one x load and two 16-byte R
// loads (its warp's rows, one address for the whole warp) for kMixRows fmaf, and x leaves
// global memory once per kMixWarps x kMixRows rows of R, where one thread per output read it
// G times through the cache.
constexpr int kMixWarps = 8;   // warps of a CTA, each its own kMixRows rows of R
constexpr int kMixRows = 8;    // sums a lane keeps: kMixRows / 4 float4 of R per step
static_assert(kMixRows % 4 == 0, "R is staged as float4");
constexpr int kMixChunk = 32;  // h per staged tile: one per lane when R is staged
constexpr int kMixQuads = kMixWarps * kMixRows / 4;  // the CTA's float4 of R per h
static_assert(kMixChunk % kMixWarps == 0 && kMixQuads % kMixWarps == 0, "the staging loops split evenly over the warps");

__global__ void __launch_bounds__(kMixWarps * 32) torq_group_mix(const float* __restrict__ x, const float* __restrict__ r,
                                                                 float* __restrict__ out, long long columns, long long groups,
                                                                 long long width) {
    __shared__ float xs[kMixChunk][32];                     // xs[h][lane] = x[n, h0 + h, k] of the lane's column
    __shared__ float4 rs[kMixWarps][kMixChunk][kMixRows / 4];  // R[g][h0 + h] of warp w's rows g, 4 per float4
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const long long d = groups * width, c = (long long)blockIdx.x * 32 + lane;
    const bool live = c < columns;
    const float* xc = live ? x + (c / width) * d + c % width : x;  // x[n, 0, k]; the one division of the thread
    const long long g_cta = (long long)blockIdx.y * kMixWarps * kMixRows, g_warp = g_cta + warp * kMixRows;
    // what this thread stages, advanced a tile at a time: x[n, h0 + warp + j kMixWarps, k] and R[g][h0 + lane]
    // for the rows g = g_cta + 4 (warp + j kMixWarps) + t (t < 4) of its float4s
    const float* xt = xc + warp * width;
    const long long x_step = kMixWarps * width;
    const float* rt = r + (g_cta + 4 * warp) * groups + lane;
    const long long r_step = 4 * kMixWarps * groups;
    float acc[kMixRows] = {};
    for (long long h0 = 0; h0 < groups; h0 += kMixChunk, xt += kMixChunk * width, rt += kMixChunk) {
        const int chunk = groups - h0 < kMixChunk ? (int)(groups - h0) : kMixChunk;
        __syncthreads();  // every lane is done with the previous tile
#pragma unroll
        for (int j = 0; j < kMixChunk / kMixWarps; ++j) {
            const int h = warp + j * kMixWarps;
            xs[h][lane] = live && h < chunk ? xt[j * x_step] : 0.f;
        }
#pragma unroll
        for (int j = 0; j < kMixQuads / kMixWarps; ++j) {  // lane = h: a warp reads consecutive values of 4 rows of R
            const int quad = warp + j * kMixWarps;       // the CTA's rows 4 quad .. 4 quad + 3
            const long long g = g_cta + 4 * quad;
            float v[4];
#pragma unroll
            for (int t = 0; t < 4; ++t) v[t] = lane < chunk && g + t < groups ? rt[j * r_step + t * groups] : 0.f;
            rs[quad / (kMixRows / 4)][lane][quad % (kMixRows / 4)] = make_float4(v[0], v[1], v[2], v[3]);
        }
        __syncthreads();
        if (!live || g_warp >= groups) continue;  // this lane's sums are not stored (it still stages tiles)
        for (int h = 0; h < chunk; ++h) {
            const float xv = xs[h][lane];
#pragma unroll
            for (int q = 0; q < kMixRows / 4; ++q) {
                const float4 rv = rs[warp][h][q];
                acc[4 * q] = fmaf(rv.x, xv, acc[4 * q]);
                acc[4 * q + 1] = fmaf(rv.y, xv, acc[4 * q + 1]);
                acc[4 * q + 2] = fmaf(rv.z, xv, acc[4 * q + 2]);
                acc[4 * q + 3] = fmaf(rv.w, xv, acc[4 * q + 3]);
            }
        }
    }
    if (!live) return;
    float* oc = out + (xc - x);  // out[n, 0, k]
#pragma unroll
    for (int t = 0; t < kMixRows; ++t)
        if (g_warp + t < groups) oc[(g_warp + t) * width] = acc[t];
}

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
        const long long row_tiles = (shape->groups + kMixWarps * kMixRows - 1) / (kMixWarps * kMixRows);
        if (row_tiles > TORQ_MAX_GRID_Y) return "R_inter has too many groups for the group-mixing kernel's grid";
        const dim3 grid((unsigned)((columns + 31) / 32), (unsigned)row_tiles);
        TORQ_LAUNCH(torq_group_mix, grid, kMixWarps * 32, stream)(src, r_dev, xf, columns, shape->groups, width);
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
