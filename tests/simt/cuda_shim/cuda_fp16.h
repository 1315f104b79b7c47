// __half for the host emulator (tests/simt): IEEE binary16 as g++'s _Float16, whose
// conversions round to nearest even, as CUDA's __float2half_rn.
#pragma once

struct __half {
    _Float16 value;
};
inline float __half2float(__half h) { return (float)h.value; }
inline __half __float2half_rn(float f) { return __half{(_Float16)f}; }
