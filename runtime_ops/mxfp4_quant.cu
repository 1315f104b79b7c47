// MXFP4 (OCP MX v1.0) fake-quant of float32 rows of 32, one warp per block.
// Bit-exact contract: torq_onnx.mxfp4.fake_quantize (floor/even/rceil via `bump`).
// The per-block arithmetic lives in mxfp4_math.cuh (host-tested); this file only maps
// blocks to warps: a butterfly reduction gives every lane the block's amax and NaN flag.
#include "mxfp4_math.cuh"

extern "C" __global__ void mxfp4_fake_quant(const float* __restrict__ z, float* __restrict__ y,
                                            long long n_blocks, float bump) {
    long long blk = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (blk >= n_blocks) return;  // whole warps exit together: n_blocks is per warp
    float v = z[blk * 32 + lane];
    int bad = !isfinite(v);
    float amax = bad ? 0.f : fabsf(v);
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
        bad |= __shfl_xor_sync(0xffffffffu, bad, o);
    }
    float out;
    if (bad) {
        out = torq_nan();  // NaN block
    } else if (amax == 0.f) {
        out = 0.f;
    } else {
        out = torq_mxfp4_element(v, torq_mxfp4_exponent(amax, bump));
    }
    y[blk * 32 + lane] = out;
}

// The whole online op for one (row, block) per thread: y[n, b, :] = MXFP4(x[n, b, :] @ R_b).
// R_b is the block's own 32x32 transform (r_stride = 1024: WUSH's per-block r_intra) or the
// shared one (r_stride = 0), row-major, staged once per CTA in shared memory; blockIdx.x is
// the block index, so every thread of a CTA uses the same R_b (broadcast reads, no bank
// conflicts), and CTAs that run together cover whole rows (contiguous DRAM pages). The 32-term dot products accumulate in i order with fmaf. A thread keeps its
// 32 inputs and 32 outputs in registers and moves 128 contiguous bytes each way (float4), so
// x is read once and y written once. `z_out` (nullable) receives the rotated block: tests
// check the quantizer bit-exact on exactly the values it saw.
extern "C" __global__ void __launch_bounds__(128)
torq_block_rotate_quant(const float* __restrict__ x, const float* __restrict__ r, float* __restrict__ y,
                        float* __restrict__ z_out, long long n_rows, int n_blocks, long long r_stride, float bump) {
    __shared__ float4 rs[256];
    const float4* rb = reinterpret_cast<const float4*>(r + blockIdx.x * r_stride);
    for (int k = threadIdx.x; k < 256; k += blockDim.x) rs[k] = rb[k];
    __syncthreads();
    long long n = (long long)blockIdx.y * blockDim.x + threadIdx.x;
    if (n >= n_rows) return;
    long long off = (n * n_blocks + blockIdx.x) * 32;
    const float4* xv = reinterpret_cast<const float4*>(x + off);
    float v[32], z[32];
    #pragma unroll
    for (int k = 0; k < 8; ++k) {
        float4 t = __ldg(xv + k);
        v[4 * k] = t.x; v[4 * k + 1] = t.y; v[4 * k + 2] = t.z; v[4 * k + 3] = t.w;
    }
    #pragma unroll
    for (int j = 0; j < 32; ++j) z[j] = 0.f;
    #pragma unroll
    for (int i = 0; i < 32; ++i) {
        #pragma unroll
        for (int k = 0; k < 8; ++k) {
            float4 w = rs[i * 8 + k];
            z[4 * k] = fmaf(v[i], w.x, z[4 * k]);
            z[4 * k + 1] = fmaf(v[i], w.y, z[4 * k + 1]);
            z[4 * k + 2] = fmaf(v[i], w.z, z[4 * k + 2]);
            z[4 * k + 3] = fmaf(v[i], w.w, z[4 * k + 3]);
        }
    }
    if (z_out != nullptr) {
        float4* zv = reinterpret_cast<float4*>(z_out + off);
        #pragma unroll
        for (int k = 0; k < 8; ++k) zv[k] = make_float4(z[4 * k], z[4 * k + 1], z[4 * k + 2], z[4 * k + 3]);
    }
    torq_mxfp4_block(z, v, bump);
    float4* yv = reinterpret_cast<float4*>(y + off);
    #pragma unroll
    for (int k = 0; k < 8; ++k) yv[k] = make_float4(v[4 * k], v[4 * k + 1], v[4 * k + 2], v[4 * k + 3]);
}
