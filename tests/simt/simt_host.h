// A host emulator of the CUDA features the torq kernels use, so that their thread mapping
// (indexing, shared-memory tiles, warp collectives, tails) runs on any CPU: every CUDA thread
// of a CTA is a fiber (a std::thread in a ThreadSanitizer build), CTAs run one after another,
// __syncthreads/__syncwarp are barriers and warp collectives exchange values through a
// per-warp slot array between two barriers. The kernel source is compiled unchanged by g++
// with this header force-included. It checks what it can of CUDA's rules (1-D blocks of
// whole warps, full-warp masks, no collective after a lane of the warp has exited, no
// barrier that some threads never reach) and aborts with a message otherwise. It does not
// model the memory system, so it says nothing about speed.
//
// Built with -fsanitize=thread it is a race checker: ThreadSanitizer reports two accesses to
// the same shared (or global) memory, one a write, that no barrier orders. Only
// __syncthreads and __syncwarp order memory here, as CUDA documents for them; a shuffle or
// redux exchanges registers and CUDA promises no memory ordering for it, so under the
// sanitizer the collectives' own barrier and slot traffic are hidden from it (see Unordered).
// A kernel that leans on a collective to order its shared-memory tile is then reported, as
// racecheck would on a GPU, instead of running correctly by the emulator's grace.
#pragma once

#include <math.h>
#include <ucontext.h>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

#include <atomic>
#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // one CTA runs at a time, so a static is the CTA's shared memory

struct dim3 {
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
    unsigned x, y, z;
};
struct float4 {
    float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
template <class T>
inline T __ldg(const T* p) { return *p; }

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace simt {

[[noreturn]] inline void fail(const char* what) {
    std::fprintf(stderr, "simt: %s\n", what);
    std::abort();
}

#if defined(__SANITIZE_THREAD__)
// Threads: ThreadSanitizer checks the memory accesses of real threads.
using Barrier = std::barrier<>;
#else
// Fibers: a CTA's threads take turns on one host thread (ucontext), switching only at
// barriers, so a launch costs no thread creation or wake-ups.
namespace fibers {
struct Fiber {
    ucontext_t context;
    const void* stack = nullptr;
    size_t stack_size = 0;
    bool done = false;
};
inline ucontext_t scheduler;
inline Fiber* current = nullptr;
inline unsigned long long progress = 0;  // barrier phases completed and threads finished
inline const void* scheduler_stack = nullptr;
inline size_t scheduler_stack_size = 0;

// AddressSanitizer's fiber annotations: it must know which stack runs (else it may report
// false stack errors); no-ops in other builds.
#if defined(__SANITIZE_ADDRESS__)
inline void* leaving(const void* to, size_t size) {
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, to, size);
    return fake;
}
inline void arrived(void* fake, bool from_scheduler) {
    __sanitizer_finish_switch_fiber(fake, from_scheduler ? &scheduler_stack : nullptr, from_scheduler ? &scheduler_stack_size : nullptr);
}
inline void exiting() { __sanitizer_start_switch_fiber(nullptr, scheduler_stack, scheduler_stack_size); }
#else
inline void* leaving(const void*, size_t) { return nullptr; }
inline void arrived(void*, bool) {}
inline void exiting() {}
#endif

inline void yield() {
    void* fake = leaving(scheduler_stack, scheduler_stack_size);
    swapcontext(&current->context, &scheduler);
    arrived(fake, true);
}
// getcontext returns twice: kept out of the launch loop, whose locals it would clobber
[[gnu::noinline]] inline void prepare(Fiber& f, char* stack, size_t size, void (*entry)()) {
    f.done = false;
    f.stack = stack;
    f.stack_size = size;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = stack;
    f.context.uc_stack.ss_size = size;
    f.context.uc_link = &scheduler;
    makecontext(&f.context, entry, 0);
}
[[gnu::noinline]] inline void resume(Fiber& f) {
    current = &f;
    void* fake = leaving(f.stack, f.stack_size);
    swapcontext(&scheduler, &f.context);
    arrived(fake, false);
}
}  // namespace fibers

// std::barrier's arrive_and_wait / arrive_and_drop for fibers: a waiting fiber yields until
// the phase it arrived in completes.
class Barrier {
   public:
    explicit Barrier(int expected) : expected_(expected) {}
    void arrive_and_wait() {
        const unsigned long long phase = phase_;
        if (++arrived_ == expected_) return complete();
        while (phase_ == phase) fibers::yield();
    }
    void arrive_and_drop() {
        if (--expected_ == arrived_ && arrived_ > 0) complete();
    }

   private:
    void complete() {
        arrived_ = 0;
        ++phase_;
        ++fibers::progress;
    }
    int expected_, arrived_ = 0;
    unsigned long long phase_ = 0;
};
#endif

struct Warp {
    Barrier sync{32};
    std::atomic<int> alive{32};
    unsigned long long slot[32];
};

struct Cta {
    explicit Cta(unsigned threads) : sync((int)threads), warps(new Warp[threads / 32]) {}
    Barrier sync;
    std::unique_ptr<Warp[]> warps;
};

#if defined(__SANITIZE_THREAD__)
extern "C" {
void AnnotateIgnoreSyncBegin(const char* file, int line);
void AnnotateIgnoreSyncEnd(const char* file, int line);
void AnnotateIgnoreReadsBegin(const char* file, int line);
void AnnotateIgnoreReadsEnd(const char* file, int line);
void AnnotateIgnoreWritesBegin(const char* file, int line);
void AnnotateIgnoreWritesEnd(const char* file, int line);
}
// While one lives, this thread's synchronization creates no happens-before edge for
// ThreadSanitizer and its memory accesses are not checked: a warp collective's exchange.
struct Unordered {
    Unordered() {
        AnnotateIgnoreSyncBegin(__FILE__, __LINE__);
        AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
        AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
    }
    ~Unordered() {
        AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
        AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
        AnnotateIgnoreSyncEnd(__FILE__, __LINE__);
    }
};
#else
struct Unordered {
    Unordered() {}  // user-provided, so an unused guard draws no warning
};
#endif

inline Cta* cta = nullptr;
inline Warp& warp() { return cta->warps[threadIdx.x >> 5]; }
inline unsigned lane() { return threadIdx.x & 31; }

// Every lane publishes its value; after the barrier, a lane sees all 32 of its warp.
template <class T>
inline Warp& publish(unsigned mask, T v) {
    static_assert(sizeof(T) <= sizeof(unsigned long long));
    if (mask != 0xffffffffu) fail("only full-warp masks are emulated");
    Warp& w = warp();
    unsigned long long bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    w.slot[lane()] = bits;
    w.sync.arrive_and_wait();
    if (w.alive.load() != 32) fail("warp collective after a lane of the warp exited");
    return w;
}

template <class T>
inline T read(const Warp& w, unsigned src_lane) {
    T out;
    std::memcpy(&out, &w.slot[src_lane & 31], sizeof(T));
    return out;
}

template <class T>
inline T shuffle(unsigned mask, T v, unsigned src_lane) {
    const Unordered exchange;
    Warp& w = publish(mask, v);
    T out = read<T>(w, src_lane);
    w.sync.arrive_and_wait();  // nobody overwrites a slot before everyone has read it
    return out;
}

// One CUDA thread's whole run: the kernel, then its exit, after which it no longer holds up
// its warp or CTA at a barrier.
template <class... Params, class... Args>
inline void run_thread(void (*kernel)(Params...), Args... args) {
    kernel(args...);
    Warp& w = warp();
    w.alive.fetch_sub(1);
    w.sync.arrive_and_drop();
    cta->sync.arrive_and_drop();
}

// A launch's shape, checked and made the kernel's gridDim and blockDim.
inline void begin_launch(dim3 grid, dim3 block) {
    if (block.y != 1 || block.z != 1 || block.x == 0 || block.x % 32) fail("only 1-D blocks of whole warps are emulated");
    gridDim = grid;
    blockDim = block;
}

// run_cta(blockIdx) for every CTA of the grid, one after another, x fastest.
template <class RunCta>
inline void for_each_cta(dim3 grid, RunCta run_cta) {
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) run_cta(dim3{bx, by, bz});
}

#if defined(__SANITIZE_THREAD__)
// Runs kernel(args...) on a grid of CTAs, one after another, on a pool of block.x host threads.
template <class... Params, class... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, Args... args) {
    begin_launch(grid, block);
    std::barrier<> start(block.x + 1), done(block.x + 1);  // the pool and this thread, per CTA
    std::unique_ptr<Cta> c;
    dim3 current;
    bool finished = false;
    std::vector<std::thread> pool;
    pool.reserve(block.x);
    for (unsigned t = 0; t < block.x; ++t)
        pool.emplace_back([&, t] {
            threadIdx = dim3{t, 0, 0};
            for (;;) {
                start.arrive_and_wait();
                if (finished) return;
                blockIdx = current;
                run_thread(kernel, args...);
                done.arrive_and_wait();
            }
        });
    for_each_cta(grid, [&](dim3 idx) {
        c = std::make_unique<Cta>(block.x);
        cta = c.get();
        current = idx;
        start.arrive_and_wait();
        done.arrive_and_wait();
    });
    finished = true;
    start.arrive_and_wait();
    for (auto& th : pool) th.join();
    cta = nullptr;
}

#else
inline std::function<void()> thread_body;  // the running launch's kernel call and exit
inline void fiber_entry() {
    fibers::arrived(nullptr, true);
    thread_body();
    fibers::current->done = true;
    fibers::exiting();  // returning resumes the scheduler (uc_link)
}

// Runs kernel(args...) on a grid of CTAs, one after another, each CTA's threads as fibers
// taken in turn; a round in which no fiber gets past a barrier or finishes is a deadlock (a
// barrier some threads of the CTA or warp never reach), reported instead of hanging.
template <class... Params, class... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, Args... args) {
    begin_launch(grid, block);
    constexpr size_t kStack = 256 << 10;
    std::vector<fibers::Fiber> fs(block.x);
    std::unique_ptr<char[]> stacks(new char[kStack * block.x]);
    thread_body = [&] { run_thread(kernel, args...); };
    for_each_cta(grid, [&](dim3 idx) {
        Cta c(block.x);
        cta = &c;
        for (unsigned t = 0; t < block.x; ++t) fibers::prepare(fs[t], stacks.get() + t * kStack, kStack, fiber_entry);
        for (unsigned left = block.x; left > 0;) {
            const unsigned long long before = fibers::progress;
            for (unsigned t = 0; t < block.x; ++t) {
                if (fs[t].done) continue;
                threadIdx = dim3{t, 0, 0};
                blockIdx = idx;
                fibers::resume(fs[t]);
                if (fs[t].done) {
                    --left;
                    ++fibers::progress;
                }
            }
            if (left > 0 && fibers::progress == before) fail("deadlock: a barrier that not every thread of its CTA or warp reaches");
        }
        cta = nullptr;
    });
    thread_body = nullptr;
}
#endif

}  // namespace simt

inline void __syncthreads() { simt::cta->sync.arrive_and_wait(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {  // a barrier that orders memory, unlike a collective
    if (mask != 0xffffffffu) simt::fail("only full-warp masks are emulated");
    simt::Warp& w = simt::warp();
    w.sync.arrive_and_wait();
    if (w.alive.load() != 32) simt::fail("__syncwarp after a lane of the warp exited");
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int = 32) { return simt::shuffle(mask, v, (unsigned)src_lane); }
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int = 32) {
    return simt::shuffle(mask, v, simt::lane() ^ (unsigned)lane_mask);
}
inline unsigned __reduce_max_sync(unsigned mask, unsigned v) {
    const simt::Unordered exchange;
    simt::Warp& w = simt::publish(mask, v);
    unsigned m = 0;
    for (unsigned i = 0; i < 32; ++i) m = simt::read<unsigned>(w, i) > m ? simt::read<unsigned>(w, i) : m;
    w.sync.arrive_and_wait();
    return m;
}
