// Runs one kernel of runtime_ops/mxfp4_quant.cu on the host emulator (simt_host.h) with the
// launch shape given on the command line. Arrays are raw float32: inputs on stdin, outputs on
// stdout. Built by tests/test_cuda_emulated.py with g++ -include simt_host.h.
//   mxfp4_fake_quant GX GY BLOCK N_BLOCKS BUMP                   in: z            out: y
//   torq_block_rotate_quant[_warp] GX GY BLOCK N_ROWS N_BLOCKS R_STRIDE BUMP
//                                                                in: x, r         out: y, z
//   torq_group_mix GX GY BLOCK ROWS GROUPS WIDTH                 in: x, r_inter   out: mixed, want
//     (want: mxfp4_math.cuh's torq_group_mix_element per output, on one host thread)
#include <limits>
#include <string>

#include "mxfp4_quant.cu"

static std::vector<float> read_floats(size_t n) {
    std::vector<float> v(n);
    if (std::fread(v.data(), sizeof(float), n, stdin) != n) simt::fail("short input on stdin");
    return v;
}

static void write_floats(const std::vector<float>& v) {
    if (std::fwrite(v.data(), sizeof(float), v.size(), stdout) != v.size()) simt::fail("could not write stdout");
}

int main(int argc, char** argv) {
    if (argc < 5) {
        std::fprintf(stderr, "usage: %s KERNEL GRID_X GRID_Y BLOCK ARGS... < in.f32 > out.f32\n", argv[0]);
        return 2;
    }
    const std::string name = argv[1];
    const dim3 grid{(unsigned)std::atol(argv[2]), (unsigned)std::atol(argv[3]), 1};
    const dim3 block{(unsigned)std::atol(argv[4]), 1, 1};
    if (name == "mxfp4_fake_quant" && argc == 7) {
        const long long n_blocks = std::atoll(argv[5]);
        const float bump = std::strtof(argv[6], nullptr);
        std::vector<float> z = read_floats(n_blocks * 32), y(z.size());
        simt::launch(mxfp4_fake_quant, grid, block, z.data(), y.data(), n_blocks, bump);
        write_floats(y);
        return 0;
    }
    if ((name == "torq_block_rotate_quant" || name == "torq_block_rotate_quant_warp") && argc == 9) {
        const long long n_rows = std::atoll(argv[5]), r_stride = std::atoll(argv[7]);
        const int n_blocks = std::atoi(argv[6]);
        const float bump = std::strtof(argv[8], nullptr);
        std::vector<float> x = read_floats(n_rows * n_blocks * 32), r = read_floats(r_stride ? n_blocks * 1024 : 1024);
        std::vector<float> y(x.size()), z(x.size());
        auto kernel = name == "torq_block_rotate_quant" ? torq_block_rotate_quant : torq_block_rotate_quant_warp;
        simt::launch(kernel, grid, block, x.data(), r.data(), y.data(), z.data(), n_rows, n_blocks, r_stride, bump);
        write_floats(y);
        write_floats(z);
        return 0;
    }
    if (name == "torq_group_mix" && argc == 8) {
        const long long rows = std::atoll(argv[5]), groups = std::atoll(argv[6]), width = std::atoll(argv[7]);
        const long long d = groups * width;
        std::vector<float> x = read_floats(rows * d), r = read_floats(groups * groups);
        std::vector<float> out(x.size(), std::numeric_limits<float>::quiet_NaN()), want(x.size());  // unwritten stays NaN
        simt::launch(torq_group_mix, grid, block, x.data(), r.data(), out.data(), rows * width, groups, width);
        for (long long n = 0; n < rows; ++n)
            for (long long g = 0; g < groups; ++g)
                for (long long k = 0; k < width; ++k)
                    want[n * d + g * width + k] = torq_group_mix_element(&r[g * groups], &x[n * d + k], groups, width);
        write_floats(out);
        write_floats(want);
        return 0;
    }
    std::fprintf(stderr, "unknown kernel or wrong argument count: %s\n", name.c_str());
    return 2;
}
