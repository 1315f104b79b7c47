// Runs the CUDA side of the ORT custom-op library (runtime_ops/ort_custom_ops_cuda.cu,
// compiled unchanged) on the host: the emulated CUDA runtime (cuda_shim/) and thread emulator
// (simt_host.h, force-included). It does what ort_custom_ops.cc's CUDA kernel does for one
// node: one torq_cuda_rotate_quantize call per input set, all on the node's one state, with
// x, y and r_intra in device memory, r_inter in host memory and a scratch buffer of exactly
// torq_cuda_scratch_bytes (so an overrun is an AddressSanitizer error), then frees the state
// and checks that no device memory is left. Built by tests/test_compiled_cuda_emulated.py:
//   library_harness ROWS BLOCKS GROUPS PER_BLOCK HALF QUANTIZE BUMP CALLS
//     stdin: CALLS x (float32, or float16 if HALF), r_inter [G, G], r_intra ([B,] 32, 32) sets
//     stdout: CALLS y (x's type);  stderr: a line "call K host-waits W" per call (the host's waits
//     for the device inside torq_cuda_rotate_quantize), then "launches L copies C
//     device-allocations-left A"
#include <string>
#include <vector>

#include "ort_custom_ops_cuda.cu"

template <class T>
static std::vector<T> read_values(size_t n) {
    std::vector<T> v(n);
    if (std::fread(v.data(), sizeof(T), n, stdin) != n) simt::fail("short input on stdin");
    return v;
}

// A device buffer holding `host`'s bytes (uninitialized if empty), as ORT's CUDA allocator would give.
static void* to_device(const void* host, size_t bytes) {
    void* p = nullptr;
    if (cudaMalloc(&p, bytes) != cudaSuccess) simt::fail("cudaMalloc");
    if (host != nullptr) cudaMemcpy(p, host, bytes, cudaMemcpyHostToDevice);
    return p;
}

int main(int argc, char** argv) {
    if (argc != 9) {
        std::fprintf(stderr, "usage: %s ROWS BLOCKS GROUPS PER_BLOCK HALF QUANTIZE BUMP CALLS\n", argv[0]);
        return 2;
    }
    TorqOpShape shape{std::atoll(argv[1]), std::atoll(argv[2]), std::atoll(argv[3]), std::atoi(argv[4]) ? 1024 : 0,
                      std::atoi(argv[5]) != 0};
    const bool quantize = std::atoi(argv[6]) != 0;
    const float bump = std::strtof(argv[7], nullptr);
    const int calls = std::atoi(argv[8]);
    const size_t total = shape.rows * shape.blocks * 32, elem = shape.half ? 2 : 4;
    const size_t r_intra_floats = (shape.r_stride ? shape.blocks : 1) * 1024;
    TorqCudaState* state = torq_cuda_state_new();
    static CUstream_st ort_stream;  // ORT's compute stream: a handle of its own, the only one work may go on
    cudaStream_t stream = &ort_stream;
    simt_rt::set_op_stream(stream);
    for (int c = 0; c < calls; ++c) {
        const std::vector<unsigned char> x = read_values<unsigned char>(total * elem);
        const std::vector<float> r_inter = read_values<float>(shape.groups * shape.groups);
        const std::vector<float> r_intra = read_values<float>(r_intra_floats);
        void* x_dev = to_device(x.data(), x.size());
        void* y_dev = to_device(nullptr, x.size());
        void* r_intra_dev = to_device(r_intra.data(), r_intra.size() * sizeof(float));
        const size_t bytes = torq_cuda_scratch_bytes(&shape, r_inter.data(), quantize);
        void* scratch = bytes ? to_device(nullptr, bytes) : nullptr;
        const long waits = simt_rt::rt().host_waits;
        if (const char* err = torq_cuda_rotate_quantize(state, stream, x_dev, y_dev, r_inter.data(), static_cast<const float*>(r_intra_dev),
                                                        &shape, quantize, bump, scratch)) {
            std::fprintf(stderr, "torq_cuda_rotate_quantize: %s\n", err);
            return 3;
        }
        std::fprintf(stderr, "call %d host-waits %ld\n", c, simt_rt::rt().host_waits - waits);
        std::vector<unsigned char> y(x.size());
        cudaMemcpy(y.data(), y_dev, y.size(), cudaMemcpyDeviceToHost);
        if (std::fwrite(y.data(), 1, y.size(), stdout) != y.size()) simt::fail("could not write stdout");
        for (void* p : {x_dev, y_dev, r_intra_dev, scratch}) cudaFree(p);
    }
    torq_cuda_state_free(state);
    std::fprintf(stderr, "launches %ld copies %ld device-allocations-left %ld\n", simt_rt::rt().launches, simt_rt::rt().copies,
                 simt_rt::live_allocations());
    return simt_rt::live_allocations() == 0 ? 0 : 4;
}
