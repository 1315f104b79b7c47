// The CUDA runtime calls of runtime_ops/ort_custom_ops_cuda.cu, emulated on the host for
// tests/simt/library_harness.cpp: "device" memory is host memory that this file tracks, so a
// host pointer handed to a kernel, a copy in the wrong direction, a free of memory that is not
// device memory or a launch shape CUDA refuses fails the run with a message, as a GPU would
// fail it with an illegal address or a launch error (or silently compute garbage). Work
// enqueued on any stream but the op's (set_op_stream: ORT's compute stream) also fails the
// run: on a GPU it would run unordered with the rest of the graph. Kernels run on
// simt_host.h's thread emulator, synchronously, so stream order is trivially kept; the
// host waits a call makes (stream synchronizations and synchronous copies) are counted.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <type_traits>

enum cudaError_t {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorInvalidDevicePointer = 17,
};
enum cudaMemcpyKind { cudaMemcpyHostToHost, cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice };
struct CUstream_st {};
typedef CUstream_st* cudaStream_t;

namespace simt_rt {

struct Runtime {
    std::mutex lock;
    std::map<uintptr_t, size_t> device;  // allocation start -> bytes
    cudaError_t last = cudaSuccess;       // what cudaGetLastError reports
    cudaStream_t op_stream = nullptr;     // the only stream work may be enqueued on
    long launches = 0, host_waits = 0, copies = 0;
};
inline Runtime& rt() {
    static Runtime r;
    return r;
}

// Whether [p, p + bytes) lies inside one device allocation.
inline bool on_device(const void* p, size_t bytes) {
    std::lock_guard<std::mutex> g(rt().lock);
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    auto it = rt().device.upper_bound(a);
    if (it == rt().device.begin()) return false;
    --it;
    return a >= it->first && a + bytes <= it->first + it->second;
}

// "emulated CUDA runtime: " what [" (" detail ")"] [" " tail], then abort.
[[noreturn]] inline void fail(const char* what, long detail = -1, const char* tail = nullptr) {
    std::fprintf(stderr, "emulated CUDA runtime: %s", what);
    if (detail >= 0) std::fprintf(stderr, " (%ld)", detail);
    if (tail != nullptr) std::fprintf(stderr, " %s", tail);
    std::fprintf(stderr, "\n");
    std::abort();
}

inline void set_op_stream(cudaStream_t s) { rt().op_stream = s; }

inline void check_stream(cudaStream_t s, const char* what) {
    if (s != rt().op_stream) fail(what, -1, "enqueued on a stream other than the op's");
}

inline long live_allocations() {
    std::lock_guard<std::mutex> g(rt().lock);
    return (long)rt().device.size();
}

template <class T>
inline void check_argument(const T& arg, int index) {
    if constexpr (std::is_pointer_v<T>)
        if (arg != nullptr && !on_device(arg, 1)) fail("a kernel argument points to host memory: argument", index);
}

// TORQ_LAUNCH(kernel, grid, block, stream)(args...): one launch, checked as CUDA checks it.
template <class... Params>
struct Launch {
    void (*kernel)(Params...);
    dim3 grid, block;
    cudaStream_t stream;
    template <class... Args>
    void operator()(Args... args) const {
        static_assert(sizeof...(Args) == sizeof...(Params), "argument count");
        if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535 ||
            block.x == 0 || block.x > 1024) {
            rt().last = cudaErrorInvalidConfiguration;  // reported later by cudaGetLastError, as CUDA does
            return;
        }
        check_stream(stream, "a kernel launch");
        int index = 0;
        (check_argument(args, index++), ...);
        ++rt().launches;
        simt::launch(kernel, grid, block, static_cast<Params>(args)...);
    }
};
template <class... Params>
Launch(void (*)(Params...), dim3, dim3, cudaStream_t) -> Launch<Params...>;

}  // namespace simt_rt

#define TORQ_LAUNCH(kernel, grid, block, stream) simt_rt::Launch{kernel, dim3(grid), dim3(block), stream}

inline cudaError_t cudaMalloc(void** p, size_t bytes) {
    if (bytes == 0) return cudaErrorInvalidValue;
    void* mem = std::malloc(bytes);
    if (mem == nullptr) return cudaErrorMemoryAllocation;
    std::memset(mem, 0xff, bytes);  // NaN as float32 and float16: a value read before it is written shows
    std::lock_guard<std::mutex> g(simt_rt::rt().lock);
    simt_rt::rt().device[reinterpret_cast<uintptr_t>(mem)] = bytes;
    *p = mem;
    return cudaSuccess;
}
template <class T>
inline cudaError_t cudaMalloc(T** p, size_t bytes) {
    return cudaMalloc(reinterpret_cast<void**>(p), bytes);
}

inline cudaError_t cudaFree(void* p) {
    if (p == nullptr) return cudaSuccess;
    std::lock_guard<std::mutex> g(simt_rt::rt().lock);
    if (simt_rt::rt().device.erase(reinterpret_cast<uintptr_t>(p)) == 0) simt_rt::fail("cudaFree of memory cudaMalloc did not return");
    std::free(p);
    return cudaSuccess;
}

// The copy itself, checked against the pointers' memory spaces.
inline cudaError_t checked_copy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
    const bool dst_dev = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
    const bool src_dev = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
    if (simt_rt::on_device(dst, bytes) != dst_dev) simt_rt::fail(dst_dev ? "copy to device memory outside a device allocation" : "copy to host memory given a device pointer");
    if (simt_rt::on_device(src, bytes) != src_dev) simt_rt::fail(src_dev ? "copy from device memory outside a device allocation" : "copy from host memory given a device pointer");
    std::memcpy(dst, src, bytes);
    ++simt_rt::rt().copies;
    return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t stream = nullptr) {
    simt_rt::check_stream(stream, "an asynchronous copy");
    return checked_copy(dst, src, bytes, kind);
}

inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
    ++simt_rt::rt().host_waits;  // returns once the copy is done: the host waits for the device
    return checked_copy(dst, src, bytes, kind);
}

inline cudaError_t cudaStreamSynchronize(cudaStream_t) {
    ++simt_rt::rt().host_waits;
    return cudaSuccess;
}

inline cudaError_t cudaGetLastError() {
    const cudaError_t e = simt_rt::rt().last;
    simt_rt::rt().last = cudaSuccess;
    return e;
}

inline const char* cudaGetErrorString(cudaError_t e) {
    switch (e) {
        case cudaSuccess: return "no error";
        case cudaErrorInvalidValue: return "invalid argument";
        case cudaErrorMemoryAllocation: return "out of memory";
        case cudaErrorInvalidConfiguration: return "invalid configuration argument";
        case cudaErrorInvalidDevicePointer: return "invalid device pointer";
    }
    return "unknown error";
}
