// Per-block MXFP4 (OCP MX v1.0) arithmetic, shared by the CUDA kernel (mxfp4_quant.cu) and
// the host test harness (mxfp4_host_harness.cu), so the arithmetic is tested bit-exact
// against torq_onnx.mxfp4 on any machine with nvcc; only the kernel's thread mapping needs
// a GPU. No standard headers: NVRTC (CuPy's compiler) ships none; nvcc provides the math
// functions for host code. Compile WITHOUT fast-math or flush-to-zero: subnormal scales
// (2^-127) and IEEE rintf (round half to even) are relied on.
#pragma once

#define TORQ_FLT_MAX 3.402823466e+38f

// Some steps below have a device form (what GPU code compiles) and a host form that a host
// compiler vectorizes; both give the same values. TORQ_DEVICE_MATH selects the device form
// in a host build too, so the host tests (and the thread emulator, tests/simt) also run the
// arithmetic the GPU runs, and compare it with the host form.
#if defined(__CUDA_ARCH__) || defined(TORQ_DEVICE_MATH)
#define TORQ_DEVICE_FORM 1
#else
#define TORQ_DEVICE_FORM 0
#endif

__host__ __device__ inline float torq_nan() { return nanf(""); }  // the output of a NaN/Inf block

// Bit casts: the scale arithmetic below uses exact powers of two built from bits rather
// than frexpf/ldexpf, which are library calls of dozens of instructions each on the GPU.
__host__ __device__ inline float torq_bits_to_float(unsigned u) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(u);
#else
    union { unsigned u; float f; } c;
    c.u = u;
    return c.f;
#endif
}

__host__ __device__ inline unsigned torq_float_to_bits(float f) {
#ifdef __CUDA_ARCH__
    return __float_as_uint(f);
#else
    union { float f; unsigned u; } c;
    c.f = f;
    return c.u;
#endif
}

// 2^k exactly, for k in [-127, 127] (2^-127 is subnormal).
__host__ __device__ inline float torq_pow2(int k) {
    return k >= -126 ? torq_bits_to_float((unsigned)(k + 127) << 23) : torq_bits_to_float(0x00400000u);
}

// Unbiased E8M0 exponent of a block from its finite amax > 0. `bump` encodes the scale rule
// (floor: 2, never; even: just below 1.75; rceil: 1.5): e = floor(log2 amax) - 2, plus one
// when amax's mantissa in [1, 2) exceeds `bump`; clamped to E8M0's finite range. Read from
// the bits (a subnormal amax is first scaled by 2^24, exactly): no log, no rounding.
__host__ __device__ inline int torq_mxfp4_exponent(float amax, float bump) {
    unsigned u = torq_float_to_bits(amax);
    int shift = 0;
    if ((u >> 23) == 0) {
        u = torq_float_to_bits(amax * 16777216.f);
        shift = 24;
    }
    float mantissa = torq_bits_to_float((u & 0x007fffffu) | 0x3f800000u);  // in [1, 2)
    int e = (int)(u >> 23) - 127 - shift - 2 + (mantissa > bump ? 1 : 0);
    return e < -127 ? -127 : (e > 127 ? 127 : e);
}

// min(a, b) of operands that are never NaN: fminf on the GPU (one instruction); on the host a
// compare, which the compiler vectorizes (it does not vectorize fminf's NaN rule).
__host__ __device__ inline float torq_min(float a, float b) {
#if TORQ_DEVICE_FORM
    return fminf(a, b);
#else
    return a < b ? a : b;
#endif
}

// E2M1 magnitude of a scaled magnitude q >= 0: round half to even on the grid
// {0, .5, 1, 1.5, 2, 3, 4, 6} (step .5 below 2, 1 below 4, 2 above), saturating at 6.
__host__ __device__ inline float torq_e2m1_round(float q) {
#if TORQ_DEVICE_FORM  // the grid step as a selected power of two: one rintf, no branch for lanes to diverge on
    const float to_steps = q < 2.f ? 2.f : (q < 4.f ? 1.f : 0.5f), step = q < 2.f ? 0.5f : (q < 4.f ? 1.f : 2.f);
    float r = rintf(q * to_steps) * step;  // both products exact: powers of two, q in [0, 8]
#else  // the same value as a select of all three candidates, which a host compiler vectorizes
    const float fine = rintf(q * 2.f) * 0.5f, unit = rintf(q), coarse = rintf(q * 0.5f) * 2.f;
    float r = q < 2.f ? fine : (q < 4.f ? unit : coarse);
#endif
    return torq_min(r, 6.f);
}

// One finite element of a block with exponent e: quantize-dequantize, sign restored.
// Multiplying by an exact power of two is correctly rounded, as ldexpf is: the same values.
// `down` = 2^-e and `up` = 2^e, computed once per block.
__host__ __device__ inline float torq_mxfp4_scaled(float v, float down, float up) {
    float r = torq_e2m1_round(fabsf(v) * down);
    float out = torq_min(r * up, TORQ_FLT_MAX);  // 8 * 2^126 would overflow float32
    return v < 0.f ? -out : out;
}

__host__ __device__ inline float torq_mxfp4_element(float v, int e) { return torq_mxfp4_scaled(v, torq_pow2(-e), torq_pow2(e)); }

// A whole block of 32 on one thread (the host harness; the kernel splits it across a warp):
// a NaN/Inf anywhere makes every output NaN, an all-zero block stays zero.
__host__ __device__ inline void torq_mxfp4_block(const float* z, float* y, float bump) {
#if TORQ_DEVICE_FORM
    float amax = 0.f;
    int bad = 0;
#pragma unroll
    for (int i = 0; i < 32; ++i) {
        bad |= !isfinite(z[i]);
        amax = fmaxf(amax, isfinite(z[i]) ? fabsf(z[i]) : 0.f);
    }
#else  // the same amax as an integer max over the bits of |z| (their order for non-negative floats),
       // which a host compiler vectorizes (not fmaxf's); a NaN/Inf bit pattern only counts as bad
    unsigned amax_bits = 0;
    for (int i = 0; i < 32; ++i) {
        const unsigned u = torq_float_to_bits(z[i]) & 0x7fffffffu;
        amax_bits = u > amax_bits ? u : amax_bits;
    }
    const int bad = amax_bits >= 0x7f800000u;  // some |z| is Inf or NaN
    const float amax = torq_bits_to_float(amax_bits);
#endif
    const int e = (bad || amax == 0.f) ? 0 : torq_mxfp4_exponent(amax, bump);
    const float down = torq_pow2(-e), up = torq_pow2(e);
#if TORQ_DEVICE_FORM
#pragma unroll  // fully unrolled, a kernel keeps z and y in registers (72 a thread on sm_90)
    for (int i = 0; i < 32; ++i) y[i] = bad ? torq_nan() : (amax == 0.f ? 0.f : torq_mxfp4_scaled(z[i], down, up));
#else  // the same values with the block-wide cases first: no per-element branch, so the host compiler vectorizes
    if (bad || amax == 0.f) {
        for (int i = 0; i < 32; ++i) y[i] = bad ? torq_nan() : 0.f;
        return;
    }
    for (int i = 0; i < 32; ++i) y[i] = torq_mxfp4_scaled(z[i], down, up);
#endif
}

// The online op's rotations as the compiled ORT op computes them on the CPU and CUDA, so both
// give the same bits: each output is an fmaf chain in ascending term order, from 0.
//
// R_intra on one block: z[j] = sum_i v[i] R[i][j] (R row-major 32 x 32), the order of both
// fused kernels in mxfp4_quant.cu.
__host__ __device__ inline void torq_block_rotate(const float* v, const float* r, float* z) {
#pragma unroll
    for (int j = 0; j < 32; ++j) z[j] = 0.f;
    for (int i = 0; i < 32; ++i) {
        const float vi = v[i];
#pragma unroll
        for (int j = 0; j < 32; ++j) z[j] = fmaf(vi, r[i * 32 + j], z[j]);
    }
}

// R_inter on one element of a token viewed as [G, W]: sum_h R[g][h] x[h][k], for the token's
// group g (r_row = R[g]) and column k (x_col = &x[0][k], rows `width` apart).
__host__ __device__ inline float torq_group_mix_element(const float* r_row, const float* x_col, long long groups, long long width) {
    float acc = 0.f;
    for (long long h = 0; h < groups; ++h) acc = fmaf(r_row[h], x_col[h * width], acc);
    return acc;
}
