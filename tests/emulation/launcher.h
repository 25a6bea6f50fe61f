// Host side of the kernel emulation: launching a kernel over a grid, and
// describing its parameters so that the Python side can check each argument's
// size (and, for pointers, its element size) the way a real launch would need.
//
// A launch runs the blocks one after another, in a shuffled order (a permutation
// drawn from the launch's seed; seed 0 keeps the natural order), and the threads
// of a block as fibers (ucontext) on this one OS thread: a thread runs until it
// calls __syncthreads() or returns, then the next one runs.  When every thread
// of the block waits at the barrier, all are released; the order in which they
// run between barriers is shuffled too, so a kernel that reads what another
// thread writes without a barrier between them is caught.  __syncthreads()
// reached by some threads while others have returned, or at different call
// sites, is an error (CUDA leaves it undefined): the launch stops and reports it.
// Shared memory (DCN_SHARED in cuda_emulation.h) is filled with 0xff bytes
// (NaN, -1) at the start of every block, so a read of an unwritten slot shows.
//
// tests/emulation/build.py appends to each stage's source a table of its
// template instances (name expression -> launch, describe) and the extern "C"
// entry points that look names up in it.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "cuda_emulation.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define DEFORMCP_FIBERS_UNDER_ASAN 1
#endif

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

inline thread_local std::string last_error;

struct Fiber {
    ucontext_t context;
    dim3 thread;
    bool finished = false;
    const char* barrier_file = nullptr;  // where it waits at __syncthreads, or null
    int barrier_line = 0;
    void* fake_stack = nullptr;  // AddressSanitizer's bookkeeping of the fiber's stack
};

// The threads of one block, and the scheduler context they return to.
struct Block {
    ucontext_t scheduler;
    std::vector<Fiber> fibers;
    int current = -1;
    void (*body)(void*) = nullptr;  // runs the kernel for the current thread
    void* body_argument = nullptr;
    // AddressSanitizer's bookkeeping of the scheduler's stack, where fibers return to.
    const void* scheduler_bottom = nullptr;
    std::size_t scheduler_size = 0;
    void* scheduler_fake_stack = nullptr;
};

inline thread_local Block* active_block = nullptr;

constexpr std::size_t kFiberStack = 256 * 1024;

inline void fiber_entry() {
    Block* block = active_block;
#ifdef DEFORMCP_FIBERS_UNDER_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &block->scheduler_bottom, &block->scheduler_size);
#endif
    block->body(block->body_argument);
    block->fibers[block->current].finished = true;
#ifdef DEFORMCP_FIBERS_UNDER_ASAN
    __sanitizer_start_switch_fiber(nullptr, block->scheduler_bottom, block->scheduler_size);
#endif
    // uc_link returns to the scheduler.
}

// Switch from the scheduler into fiber i, and back when it waits or returns.
inline void resume(Block& block, int i, char* stack) {
    block.current = i;
    threadIdx = block.fibers[i].thread;
#ifdef DEFORMCP_FIBERS_UNDER_ASAN
    __sanitizer_start_switch_fiber(&block.scheduler_fake_stack, stack, kFiberStack);
#else
    (void)stack;
#endif
    swapcontext(&block.scheduler, &block.fibers[i].context);
#ifdef DEFORMCP_FIBERS_UNDER_ASAN
    __sanitizer_finish_switch_fiber(block.scheduler_fake_stack, nullptr, nullptr);
#endif
}

}  // namespace emulation

// __syncthreads() of the emulation (cuda_emulation.h declares it and maps the name here).
void emulation_sync_threads(const char* file, int line) {
    emulation::Block* block = emulation::active_block;
    if (block == nullptr) {
        std::fprintf(stderr, "__syncthreads() called outside an emulated launch (%s:%d)\n", file, line);
        std::abort();
    }
    emulation::Fiber& fiber = block->fibers[block->current];
    fiber.barrier_file = file;
    fiber.barrier_line = line;
#ifdef DEFORMCP_FIBERS_UNDER_ASAN
    __sanitizer_start_switch_fiber(&fiber.fake_stack, block->scheduler_bottom, block->scheduler_size);
#endif
    swapcontext(&fiber.context, &block->scheduler);
#ifdef DEFORMCP_FIBERS_UNDER_ASAN
    __sanitizer_finish_switch_fiber(fiber.fake_stack, &block->scheduler_bottom, &block->scheduler_size);
#endif
}

namespace emulation {

// Run one block's threads to completion; false (with last_error set) on a barrier misuse.
inline bool run_block(Block& block, unsigned threads, const dim3& block_dim, std::mt19937_64* shuffle,
                      char* stacks) {
    block.fibers.assign(threads, Fiber{});
    for (unsigned t = 0; t < threads; ++t) {
        Fiber& fiber = block.fibers[t];
        fiber.thread = dim3{t % block_dim.x, (t / block_dim.x) % block_dim.y, t / (block_dim.x * block_dim.y)};
        getcontext(&fiber.context);
        fiber.context.uc_stack.ss_sp = stacks + std::size_t(t) * kFiberStack;
        fiber.context.uc_stack.ss_size = kFiberStack;
        fiber.context.uc_link = &block.scheduler;
        makecontext(&fiber.context, fiber_entry, 0);
    }
    ++block_generation;  // fresh (poisoned) shared memory for this block
    std::vector<int> order(threads);
    std::iota(order.begin(), order.end(), 0);
    for (;;) {
        if (shuffle != nullptr) std::shuffle(order.begin(), order.end(), *shuffle);
        for (int i : order) {
            Fiber& fiber = block.fibers[i];
            if (!fiber.finished && fiber.barrier_file == nullptr) resume(block, i, stacks + std::size_t(i) * kFiberStack);
        }
        unsigned waiting = 0, finished = 0;
        const Fiber* first_waiting = nullptr;
        for (const Fiber& fiber : block.fibers) {
            if (fiber.finished) {
                ++finished;
            } else {
                ++waiting;
                if (first_waiting == nullptr) first_waiting = &fiber;
            }
        }
        if (waiting == 0) return true;
        if (finished != 0) {
            last_error = std::to_string(waiting) + " threads of block (" + std::to_string(blockIdx.x) + ", " +
                         std::to_string(blockIdx.y) + ", " + std::to_string(blockIdx.z) + ") wait at __syncthreads() (" +
                         first_waiting->barrier_file + ":" + std::to_string(first_waiting->barrier_line) + ") while " +
                         std::to_string(finished) + " have returned";
            return false;
        }
        for (const Fiber& fiber : block.fibers) {
            if (fiber.barrier_line != first_waiting->barrier_line ||
                std::strcmp(fiber.barrier_file, first_waiting->barrier_file) != 0) {
                last_error = std::string("threads of one block wait at different __syncthreads(): ") +
                             first_waiting->barrier_file + ":" + std::to_string(first_waiting->barrier_line) + " and " +
                             fiber.barrier_file + ":" + std::to_string(fiber.barrier_line);
                return false;
            }
        }
        for (Fiber& fiber : block.fibers) fiber.barrier_file = nullptr;
    }
}

template <typename... Args>
struct KernelCall {
    void (*kernel)(Args...);
    void** args;
    static void run(void* self) {
        auto* call_ = static_cast<KernelCall*>(self);
        call(call_->kernel, call_->args, std::index_sequence_for<Args...>{});
    }
};

// Run every block (in an order shuffled by `seed`, natural for 0) and every thread
// of each as a fiber.  Returns 0, or -1 with last_error set.
template <typename... Args>
int launch(void (*kernel)(Args...), const unsigned* grid, const unsigned* block_size, void** args,
           unsigned long long seed) {
    gridDim = dim3{grid[0], grid[1], grid[2]};
    blockDim = dim3{block_size[0], block_size[1], block_size[2]};
    const unsigned threads = block_size[0] * block_size[1] * block_size[2];
    const unsigned long long blocks = 1ull * grid[0] * grid[1] * grid[2];
    std::vector<unsigned long long> order(blocks);
    std::iota(order.begin(), order.end(), 0ull);
    std::mt19937_64 rng(seed);
    if (seed != 0) std::shuffle(order.begin(), order.end(), rng);
    std::unique_ptr<char[]> stacks(new char[std::size_t(threads) * kFiberStack]);
    KernelCall<Args...> kernel_call{kernel, args};
    Block block;
    block.body = &KernelCall<Args...>::run;
    block.body_argument = &kernel_call;
    active_block = &block;
    for (unsigned long long linear : order) {
        blockIdx = dim3{unsigned(linear % grid[0]), unsigned(linear / grid[0] % grid[1]),
                        unsigned(linear / (1ull * grid[0] * grid[1]))};
        if (!run_block(block, threads, blockDim, seed != 0 ? &rng : nullptr, stacks.get())) {
            active_block = nullptr;
            return -1;
        }
    }
    active_block = nullptr;
    return 0;
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
    int (*launch)(const unsigned* grid, const unsigned* block, void** args, unsigned long long seed);
    int (*describe)(int* sizes, int* element_sizes, int capacity);
};

}  // namespace emulation

extern "C" const char* deformcp_emulated_last_error() { return emulation::last_error.c_str(); }

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
