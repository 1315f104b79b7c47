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
