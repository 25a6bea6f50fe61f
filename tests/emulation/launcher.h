// Host side of the kernel emulation: launching a kernel over a grid, and
// describing its parameters so that the Python side can check each argument's
// size (and, for pointers, its element size) the way a real launch would need.
//
// tests/emulation/build.py appends to each stage's source a table of its
// template instances (name expression -> launch, describe) and the extern "C"
// entry points that look names up in it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "cuda_emulation.h"

namespace emulation {

template <typename T>
struct Parameter {
    static constexpr int size = int(sizeof(T));
    static constexpr int element_size = 0;  // not a pointer
};

template <typename T>
struct Parameter<T*> {
    static constexpr int size = int(sizeof(T*));
    static constexpr int element_size = int(sizeof(T));
};

template <typename... Args, std::size_t... I>
void call(void (*kernel)(Args...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<Args>*>(args[I])...);
}

// Run every thread of every block, one after another.
template <typename... Args>
void launch(void (*kernel)(Args...), const unsigned* grid, const unsigned* block, void** args) {
    gridDim = dim3{grid[0], grid[1], grid[2]};
    blockDim = dim3{block[0], block[1], block[2]};
    for (unsigned bz = 0; bz < grid[2]; ++bz)
        for (unsigned by = 0; by < grid[1]; ++by)
            for (unsigned bx = 0; bx < grid[0]; ++bx)
                for (unsigned tz = 0; tz < block[2]; ++tz)
                    for (unsigned ty = 0; ty < block[1]; ++ty)
                        for (unsigned tx = 0; tx < block[0]; ++tx) {
                            blockIdx = dim3{bx, by, bz};
                            threadIdx = dim3{tx, ty, tz};
                            call(kernel, args, std::index_sequence_for<Args...>{});
                        }
}

// Write each parameter's size and element size; return the parameter count,
// or -1 if it exceeds `capacity`.
template <typename... Args>
int describe(void (*)(Args...), int* sizes, int* element_sizes, int capacity) {
    constexpr int count = int(sizeof...(Args));
    if (count > capacity) return -1;
    const int s[] = {Parameter<Args>::size..., 0};
    const int e[] = {Parameter<Args>::element_size..., 0};
    for (int i = 0; i < count; ++i) {
        sizes[i] = s[i];
        element_sizes[i] = e[i];
    }
    return count;
}

struct Entry {
    const char* name;
    void (*launch)(const unsigned* grid, const unsigned* block, void** args);
    int (*describe)(int* sizes, int* element_sizes, int capacity);
};

}  // namespace emulation

// The 16-bit conversions, exported so the tests can check them against NumPy and ml_dtypes.
extern "C" void deformcp_emulated_to_half(const float* in, std::uint16_t* out, long n) {
    for (long i = 0; i < n; ++i) out[i] = __float2half_rn(in[i]).bits;
}

extern "C" void deformcp_emulated_from_half(const std::uint16_t* in, float* out, long n) {
    for (long i = 0; i < n; ++i) out[i] = __half2float(__half{in[i]});
}

extern "C" void deformcp_emulated_to_bfloat16(const float* in, std::uint16_t* out, long n) {
    for (long i = 0; i < n; ++i) out[i] = __float2bfloat16_rn(in[i]).bits;
}

extern "C" void deformcp_emulated_from_bfloat16(const std::uint16_t* in, float* out, long n) {
    for (long i = 0; i < n; ++i) out[i] = __bfloat162float(__nv_bfloat16{in[i]});
}
