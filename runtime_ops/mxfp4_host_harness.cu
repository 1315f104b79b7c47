// Host harness for mxfp4_math.cuh: reads float32 blocks of 32 from stdin, writes their
// MXFP4 fake-quant (the kernel's per-block arithmetic, run on the CPU) to stdout.
// Usage: mxfp4_host_harness BUMP < in.f32 > out.f32   (built by the tests with nvcc)
#include <cstdio>
#include <cstdlib>

#include "mxfp4_math.cuh"

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s BUMP < blocks.f32 > out.f32\n", argv[0]);
        return 2;
    }
    float bump = std::strtof(argv[1], nullptr);
    float z[32], y[32];
    while (std::fread(z, sizeof(float), 32, stdin) == 32) {
        torq_mxfp4_block(z, y, bump);
        if (std::fwrite(y, sizeof(float), 32, stdout) != 32) return 1;
    }
    return std::ferror(stdin) ? 1 : 0;
}
