// Interface between the ORT custom-op library's registration (ort_custom_ops.cc, host C++)
// and its CUDA kernels (ort_custom_ops_cuda.cu, nvcc).
#pragma once

#include <stddef.h>
#include <stdint.h>

// The validated geometry of one TorqRotateQuantize call.
struct TorqOpShape {
    int64_t rows;      // tokens: x's element count / hidden size
    int64_t blocks;    // B = hidden size / 32
    int64_t groups;    // G: r_inter is [G, G]; [[1]] mixes nothing
    int64_t r_stride;  // floats between consecutive blocks' R_intra: 1024 (per block) or 0 (shared)
    bool half;         // x and y are float16 (else float32)
};

#ifdef __cplusplus
extern "C" {
#endif

// An exported [[1]] R_inter, which every implementation skips.
static inline int torq_inter_is_identity(const float* r_inter, int64_t groups) { return groups == 1 && r_inter[0] == 1.f; }

#ifdef TORQ_ORTOPS_CUDA
// Per-node device state: the device copy of a constant R_inter, shared by concurrent calls.
typedef struct TorqCudaState TorqCudaState;
TorqCudaState* torq_cuda_state_new(void);
void torq_cuda_state_free(TorqCudaState* state);
// The device scratch memory one call needs (0: none), for torq_cuda_rotate_quantize's `scratch`.
size_t torq_cuda_scratch_bytes(const TorqOpShape* shape, const float* r_inter, bool quantize);
// y = TorqRotateQuantize(x) (TorqRotate(x) unless `quantize`) on `stream` (a cudaStream_t);
// x, y, r_intra and `scratch` (torq_cuda_scratch_bytes of it; the call's work on `stream`
// uses it, so it may be freed on return only to an allocator that orders reuse on the
// stream, as ORT's does) in device memory, r_inter in host memory. Returns nullptr, or a
// message naming the CUDA error.
const char* torq_cuda_rotate_quantize(TorqCudaState* state, void* stream, const void* x, void* y, const float* r_inter,
                                      const float* r_intra, const TorqOpShape* shape, bool quantize, float bump, void* scratch);
#endif

#ifdef __cplusplus
}
#endif
