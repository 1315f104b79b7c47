// Interface between the ORT custom-op library's registration (ort_custom_ops.cc, host C++)
// and its CUDA kernels (ort_custom_ops_cuda.cu, nvcc).
#pragma once

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
// Per-node device state: the R_inter copy on the device and scratch buffers.
typedef struct TorqCudaState TorqCudaState;
TorqCudaState* torq_cuda_state_new(void);
void torq_cuda_state_free(TorqCudaState* state);
// y = TorqRotateQuantize(x) (TorqRotate(x) unless `quantize`) on `stream` (a cudaStream_t);
// x, y, r_intra in device memory, r_inter in host memory. Returns nullptr, or a message
// naming the CUDA error.
const char* torq_cuda_rotate_quantize(TorqCudaState* state, void* stream, const void* x, void* y, const float* r_inter,
                                      const float* r_intra, const TorqOpShape* shape, bool quantize, float bump);
#endif

#ifdef __cplusplus
}
#endif
