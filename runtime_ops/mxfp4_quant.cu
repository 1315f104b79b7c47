// The online op's CUDA kernels, built by NVRTC for CuPy (torq_onnx.runtime_ops.cuda) and by
// nvcc into the ORT custom-op library (ort_custom_ops_cuda.cu includes this file): the MXFP4
// quantizer alone, the fused R_intra + quantizer in two thread mappings, and R_inter's group
// mixing. Bit-exact contract: torq_onnx.mxfp4.fake_quantize (floor/even/rceil via `bump`) on
// the rotated values, which are the fmaf chains of mxfp4_math.cuh (host-tested, and what the
// CPU library computes); this file only maps the work to threads.
#include "mxfp4_math.cuh"

// MXFP4 (OCP MX v1.0) fake-quant of float32 rows of 32, one warp per block: a butterfly
// reduction gives every lane the block's amax and NaN flag.
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

// The same op as torq_block_rotate_quant with coalesced memory access: one warp per (row,
// block), lane j computing output j, so every global load and store of a warp covers whole
// 128-byte lines. A CTA's TORQ_W_WARPS warps own consecutive blocks (a row step touches
// TORQ_W_WARPS * 128 contiguous bytes) and walk the same TORQ_W_ROWS rows; lane j keeps
// column j of its block's R_b in registers. A step moves TORQ_W_STEP rows: one 16-byte load
// per lane fills the warp's tile in shared memory, the next step's load is issued before this
// step's arithmetic, and every lane reads the row back as broadcasts. The dot product is the
// same fmaf chain over i as the thread-per-block kernel, so z is bit-identical to it.
// The quantizer then runs transposed: the step's z goes through a second tile so that each
// lane holds 4 consecutive elements of one row (lanes 8r..8r+7 row r), and a row's block
// exponent is worked out once for the whole step (8 lanes a row, 4 rows at once) instead of
// once per row; y and z_out leave as one 16-byte store per lane. The same per-element
// functions as torq_mxfp4_block, so y is bit-identical too.
#define TORQ_W_WARPS 8
#define TORQ_W_ROWS 128
#define TORQ_W_STEP 4  // rows per step: 32 lanes x float4 = TORQ_W_STEP rows of 32 floats

// The maximum of v over the 8 aligned lanes 8r..8r+7 that hold one row of a step.
__device__ inline unsigned torq_row_max_u32(unsigned v) {
    #pragma unroll
    for (int o = 1; o < 8; o <<= 1) {
        const unsigned w = __shfl_xor_sync(0xffffffffu, v, o);
        v = w > v ? w : v;
    }
    return v;
}

extern "C" __global__ void __launch_bounds__(TORQ_W_WARPS * 32)
torq_block_rotate_quant_warp(const float* __restrict__ x, const float* __restrict__ r, float* __restrict__ y,
                             float* __restrict__ z_out, long long n_rows, int n_blocks, long long r_stride, float bump) {
    __shared__ float4 tile[TORQ_W_WARPS][TORQ_W_STEP * 8];
    __shared__ float4 ztile[TORQ_W_WARPS][TORQ_W_STEP * 8];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int b = blockIdx.x * TORQ_W_WARPS + warp;
    const long long row0 = (long long)blockIdx.y * TORQ_W_ROWS;
    if (b >= n_blocks || row0 >= n_rows) return;  // whole warps exit together
    const long long rows = n_rows - row0 < TORQ_W_ROWS ? n_rows - row0 : TORQ_W_ROWS;
    const float* rb = r + b * r_stride;
    float rc[32];  // rc[i] = R_b[i][lane]
    #pragma unroll
    for (int i = 0; i < 32; ++i) rc[i] = __ldg(rb + i * 32 + lane);
    const long long row_f4 = (long long)n_blocks * 8;  // one row of x, in float4
    const float4* xb = reinterpret_cast<const float4*>(x) + row0 * row_f4 + b * 8;
    const int tr = lane >> 3, tc = lane & 7;  // this lane moves float4 tc of tile row tr
    float4 next = make_float4(0.f, 0.f, 0.f, 0.f);
    if (tr < rows) next = __ldg(xb + tr * row_f4 + tc);
    float* zrow = reinterpret_cast<float*>(ztile[warp]);
    // Two barriers a step order both tiles: the one after the tile store also orders the last
    // step's z-tile reads before this step's z-tile stores, and the one after the z-tile store
    // also orders this step's tile reads before the next step's tile store.
    for (long long s = 0; s < rows; s += TORQ_W_STEP) {
        tile[warp][lane] = next;
        __syncwarp();
        if (s + TORQ_W_STEP + tr < rows) next = __ldg(xb + (s + TORQ_W_STEP + tr) * row_f4 + tc);
        float z[TORQ_W_STEP];  // the step's rows as independent fmaf chains (latency hiding)
        #pragma unroll
        for (int k = 0; k < TORQ_W_STEP; ++k) z[k] = 0.f;
        #pragma unroll
        for (int q = 0; q < 8; ++q) {
            #pragma unroll
            for (int k = 0; k < TORQ_W_STEP; ++k) {
                const float4 t = tile[warp][k * 8 + q];
                z[k] = fmaf(t.x, rc[4 * q], z[k]);
                z[k] = fmaf(t.y, rc[4 * q + 1], z[k]);
                z[k] = fmaf(t.z, rc[4 * q + 2], z[k]);
                z[k] = fmaf(t.w, rc[4 * q + 3], z[k]);
            }
        }
        #pragma unroll
        for (int k = 0; k < TORQ_W_STEP; ++k) zrow[k * 32 + lane] = z[k];
        __syncwarp();
        const float4 v = ztile[warp][lane];  // row tr of the step, elements 4 tc .. 4 tc + 3
        const float e4[4] = {v.x, v.y, v.z, v.w};
        // the block's amax over the bits of |v| (their order for non-negative floats); a NaN/Inf
        // maps to +Inf's bits, above every finite magnitude, so the same max flags the block
        const unsigned inf_bits = 0x7f800000u;
        unsigned m = 0u;
        #pragma unroll
        for (int i = 0; i < 4; ++i) {
            const unsigned u = isfinite(e4[i]) ? torq_float_to_bits(fabsf(e4[i])) : inf_bits;
            m = u > m ? u : m;
        }
        m = torq_row_max_u32(m);
        float o[4];
        if (m == inf_bits || m == 0u) {
            #pragma unroll
            for (int i = 0; i < 4; ++i) o[i] = m ? torq_nan() : 0.f;
        } else {
            const int e = torq_mxfp4_exponent(torq_bits_to_float(m), bump);
            const float down = torq_pow2(-e), up = torq_pow2(e);
            #pragma unroll
            for (int i = 0; i < 4; ++i) o[i] = torq_mxfp4_scaled(e4[i], down, up);
        }
        if (s + tr < rows) {  // a last partial step computes stale tile rows and drops them
            const long long off = ((row0 + s + tr) * n_blocks + b) * 8 + tc;  // in float4
            if (z_out != nullptr) reinterpret_cast<float4*>(z_out)[off] = v;
            reinterpret_cast<float4*>(y)[off] = make_float4(o[0], o[1], o[2], o[3]);
        }
    }
}

// R_inter's mixing, a product out[n] = R X[n] per token with X[n] = x[n] viewed as [G, W]:
// out[n, g, k] = sum_h R[g][h] x[n, h, k], each sum the fmaf chain over h = 0, 1, ..., G-1 of
// mxfp4_math.cuh's torq_group_mix_element (the CPU library's order, so the bits are its bits).
// A "column" is one (n, k); a CTA computes kMixWarps x kMixRows consecutive g for 32
// consecutive columns, h in tiles of kMixChunk: the tile's x values (32 columns) and R values
// (the CTA's rows) are staged in shared memory once and each is read by many sums, a lane
// keeping kMixRows sums in registers. Per step h a lane issues one x load and two 16-byte R
// loads (its warp's rows, one address for the whole warp) for kMixRows fmaf, and x leaves
// global memory once per kMixWarps x kMixRows rows of R, where one thread per output read it
// G times through the cache. Its launch (torq_onnx.runtime_ops.cuda.group_mix_launch, and
// torq_cuda_rotate_quantize in the library): TORQ_MIX_WARPS x 32 threads, grid
// (ceil(columns / 32), ceil(G / (TORQ_MIX_WARPS x TORQ_MIX_ROWS))).
#define TORQ_MIX_WARPS 8  // warps of a CTA, each its own TORQ_MIX_ROWS rows of R
#define TORQ_MIX_ROWS 8   // sums a lane keeps: TORQ_MIX_ROWS / 4 float4 of R per step
constexpr int kMixWarps = TORQ_MIX_WARPS;
constexpr int kMixRows = TORQ_MIX_ROWS;
static_assert(kMixRows % 4 == 0, "R is staged as float4");
constexpr int kMixChunk = 32;  // h per staged tile: one per lane when R is staged
constexpr int kMixQuads = kMixWarps * kMixRows / 4;  // the CTA's float4 of R per h
static_assert(kMixChunk % kMixWarps == 0 && kMixQuads % kMixWarps == 0, "the staging loops split evenly over the warps");

extern "C" __global__ void __launch_bounds__(kMixWarps * 32)
torq_group_mix(const float* __restrict__ x, const float* __restrict__ r, float* __restrict__ out, long long columns,
               long long groups, long long width) {
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
