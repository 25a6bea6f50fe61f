// A CPU stand-in for the parts of CUDA that kernels/*.cu use, so that g++
// compiles the very kernel sources NVRTC compiles and the tests can run them
// against the NumPy oracle on a machine without a GPU.
//
// A "launch" (launcher.h) runs the blocks one after another in a shuffled order,
// and the threads of a block as fibers on one OS thread, switching at
// __syncthreads(); threadIdx/blockIdx are set here for the running thread.
// Shared memory is declared with DCN_SHARED(type, name) (deform_common.cuh maps
// it to __shared__ for NVRTC); here it is one buffer per block, poisoned with
// 0xff bytes when the block starts.  atomicAdd is a plain add: only one thread
// runs at a time, and it never yields inside an addition.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

// __syncthreads() with its call site, so that the launcher can check that every thread
// of a block waits at the same barrier (launcher.h defines it).
void emulation_sync_threads(const char* file, int line);
#define __syncthreads() emulation_sync_threads(__FILE__, __LINE__)

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emulation {

// Counts the blocks run on this OS thread; shared memory is poisoned when it changes.
inline thread_local unsigned long long block_generation = 0;

// The block's instance of one DCN_SHARED variable (one per type and source line).
template <typename T, int Line>
T& block_shared() {
    alignas(16) static thread_local unsigned char storage[sizeof(T)];
    static thread_local unsigned long long generation = 0;
    if (generation != block_generation) {
        std::memset(storage, 0xff, sizeof storage);
        generation = block_generation;
    }
    return *reinterpret_cast<T*>(storage);
}

}  // namespace emulation

#define DCN_SHARED(type, name) type& name = ::emulation::block_shared<type, __LINE__>()

using std::floor;
using std::isnan;

inline float atomicAdd(float* address, float value) {
    const float old = *address;
    *address = old + value;
    return old;
}

inline double atomicAdd(double* address, double value) {
    const double old = *address;
    *address = old + value;
    return old;
}

// The 16-bit float types hold only their bits: every conversion in the kernels
// is explicit, through the functions below, as it must be for NVRTC too.
struct __half {
    std::uint16_t bits;
};

struct __nv_bfloat16 {
    std::uint16_t bits;
};

namespace emulation {

inline std::uint32_t float_bits(float f) {
    std::uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

inline float bits_float(std::uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

}  // namespace emulation

inline float __half2float(__half h) {
    const std::uint32_t sign = std::uint32_t(h.bits & 0x8000u) << 16;
    const std::uint32_t exponent = (h.bits >> 10) & 0x1fu;
    const std::uint32_t mantissa = h.bits & 0x3ffu;
    if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
        const float magnitude = std::ldexp(float(mantissa), -24);
        return sign ? -magnitude : magnitude;
    }
    if (exponent == 0x1f) return emulation::bits_float(sign | 0x7f800000u | (mantissa << 13));  // inf, NaN
    return emulation::bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// Round to nearest, ties to even; overflow to infinity; NaN stays NaN.
inline __half __float2half_rn(float f) {
    const std::uint32_t u = emulation::float_bits(f);
    const std::uint16_t sign = std::uint16_t((u >> 16) & 0x8000u);
    const std::uint32_t magnitude = u & 0x7fffffffu;
    if (magnitude > 0x7f800000u) return __half{std::uint16_t(sign | 0x7e00u)};
    if (magnitude >= 0x47800000u) return __half{std::uint16_t(sign | 0x7c00u)};  // >= 65536
    if (magnitude < 0x38800000u) {
        // Below the smallest normal half (2^-14): a multiple of 2^-24.  Scaling by
        // 2^24 is exact and nearbyint rounds half to even in the default mode.
        const float units = std::nearbyint(std::ldexp(emulation::bits_float(magnitude), 24));
        return __half{std::uint16_t(sign | std::uint16_t(units))};
    }
    // Rebias the exponent (127 -> 15), then round the 13 dropped bits to nearest even;
    // a carry into the exponent (up to infinity) is the correct result.
    const std::uint32_t rounded = magnitude - 0x38000000u + 0x0fffu + ((magnitude >> 13) & 1u);
    return __half{std::uint16_t(sign | (rounded >> 13))};
}

inline __half __float2half(float f) { return __float2half_rn(f); }

inline float __bfloat162float(__nv_bfloat16 b) { return emulation::bits_float(std::uint32_t(b.bits) << 16); }

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    const std::uint32_t u = emulation::float_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{std::uint16_t((u >> 16) | 0x0040u)};  // quiet NaN
    const std::uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16{std::uint16_t(rounded >> 16)};
}

inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
