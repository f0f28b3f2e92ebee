// CPU build of the kvc kernels (see kvc_emu.hpp), loaded by kvc/gpu/emulator.py with ctypes.
//
//   g++ -std=c++20 -O1 -ffp-contract=off -fno-fast-math -pthread -shared -fPIC kvc_emu.cpp -o kvc_emu.so
//
// kvc_emu_launch(name, grid, block, argv) mirrors cuLaunchKernel: argv[i] points to the value of the
// i-th kernel parameter.

#include "kvc_emu.hpp"

#include <functional>
#include <map>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>

thread_local dim3 threadIdx;
dim3 blockIdx, blockDim, gridDim;
KvcEmuBlock* kvc_emu_block = nullptr;

#include "../turboquant.cu"
#include "../tq_attention.cu"
#include "../minmax.cu"

namespace {

template <class... A, std::size_t... I>
void invoke(void (*kernel)(A...), void** argv, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<A>*>(argv[I])...);
}

template <class... A>
std::function<void(void**)> invoker(void (*kernel)(A...)) {
    return [kernel](void** argv) { invoke(kernel, argv, std::index_sequence_for<A...>{}); };
}

const std::map<std::string, std::function<void(void**)>>& table() {
    static const std::map<std::string, std::function<void(void**)>> t = {
        {"tq_encode", invoker(tq_encode)},
        {"tq_decode", invoker(tq_decode)},
        {"tq_score", invoker(tq_score)},
        {"tq_value", invoker(tq_value)},
        {"minmax_quantize", invoker(minmax_quantize)},
        {"minmax_dequantize", invoker(minmax_dequantize)},
    };
    return t;
}

}  // namespace

extern "C" int kvc_emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                              void** argv) {
    auto it = table().find(name);
    if (it == table().end()) return 1;
    if (bx == 0 || bx > 1024) return 2;
    gridDim = dim3{gx, gy, gz};
    blockDim = dim3{bx, 1, 1};
    const auto& fn = it->second;
    for (unsigned z = 0; z < gz; ++z)
        for (unsigned y = 0; y < gy; ++y)
            for (unsigned x = 0; x < gx; ++x) {
                blockIdx = dim3{x, y, z};
                KvcEmuBlock block(bx);
                kvc_emu_block = &block;
                std::vector<std::thread> threads;
                threads.reserve(bx);
                for (unsigned t = 0; t < bx; ++t)
                    threads.emplace_back([&block, &fn, argv, t] {
                        threadIdx = dim3{t, 0, 0};
                        fn(argv);
                        // a finished thread no longer takes part in barriers
                        block.warp_barriers[t / 32]->arrive_and_drop();
                        block.block_barrier.arrive_and_drop();
                    });
                for (auto& th : threads) th.join();
                kvc_emu_block = nullptr;
            }
    return 0;
}
