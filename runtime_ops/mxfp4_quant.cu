// MXFP4 (OCP MX v1.0) fake-quant of float32 rows of 32, one warp per block.
// Bit-exact contract: torq_onnx.mxfp4.fake_quantize (floor/even/rceil via `bump`).
// Compile WITHOUT fast-math: subnormal scales (2^-127) and IEEE rintf/ldexpf are relied on.
#include <cfloat>

extern "C" __global__ void mxfp4_fake_quant(const float* __restrict__ z, float* __restrict__ y,
                                            long long n_blocks, float bump) {
    long long blk = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (blk >= n_blocks) return;  // whole warps exit together: n_blocks is per warp
    float v = z[blk * 32 + lane];
    float a = fabsf(v);
    int bad = !isfinite(v);
    float amax = bad ? 0.f : a;
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
        bad |= __shfl_xor_sync(0xffffffffu, bad, o);
    }
    float out;
    if (bad) {
        out = __int_as_float(0x7fc00000);  // NaN block
    } else if (amax == 0.f) {
        out = 0.f;
    } else {
        int ex;
        float m = frexpf(amax, &ex);          // amax = m * 2^ex, m in [0.5, 1)
        int e = ex - 1 - 2 + ((2.f * m) > bump ? 1 : 0);
        e = max(-127, min(127, e));
        float q = ldexpf(a, -e);              // exact power-of-two scaling
        float r = q < 2.f ? rintf(q * 2.f) * 0.5f : (q < 4.f ? rintf(q) : rintf(q * 0.5f) * 2.f);
        r = fminf(r, 6.f);                    // E2M1 saturation
        out = fminf(ldexpf(r, e), FLT_MAX);   // 8 * 2^126 would overflow float32
        if (v < 0.f) out = -out;
    }
    y[blk * 32 + lane] = out;
}
