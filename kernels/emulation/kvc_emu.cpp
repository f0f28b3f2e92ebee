// CPU build of the kvc kernels (see kvc_emu.hpp), loaded by kvc/gpu/emulator.py with ctypes.
//
//   g++ -std=c++20 -O1 -ffp-contract=off -fno-fast-math -shared -fPIC kvc_emu.cpp -o kvc_emu.so
//
// kvc_emu_launch(name, grid, block, argv) mirrors cuLaunchKernel: argv[i] points to the value of the
// i-th kernel parameter.

#include "kvc_emu.hpp"

#include <ucontext.h>

#include <functional>
#include <map>
#include <string>
#include <type_traits>
#include <utility>

dim3 threadIdx, blockIdx, blockDim, gridDim;
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

constexpr std::size_t kStack = 256 * 1024;

struct Fiber {
    ucontext_t ctx;
    std::vector<char> stack = std::vector<char>(kStack);
    unsigned tid = 0;
    bool done = false;
};

ucontext_t g_scheduler;
Fiber* g_current = nullptr;
const std::function<void(void**)>* g_fn = nullptr;
void** g_argv = nullptr;

void fiber_main() {
    (*g_fn)(g_argv);
    Fiber* self = g_current;
    kvc_emu_drop(kvc_emu_block->warp_barriers[self->tid / 32]);
    kvc_emu_drop(kvc_emu_block->block_barrier);
    self->done = true;
    swapcontext(&self->ctx, &g_scheduler);  // never resumed
}

}  // namespace

void kvc_emu_yield() { swapcontext(&g_current->ctx, &g_scheduler); }

extern "C" int kvc_emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                              void** argv) {
    auto it = table().find(name);
    if (it == table().end()) return 1;
    if (bx == 0 || bx > 1024) return 2;
    gridDim = dim3{gx, gy, gz};
    blockDim = dim3{bx, 1, 1};
    g_fn = &it->second;
    g_argv = argv;
    std::vector<Fiber> fibers(bx);
    for (unsigned z = 0; z < gz; ++z)
        for (unsigned y = 0; y < gy; ++y)
            for (unsigned x = 0; x < gx; ++x) {
                blockIdx = dim3{x, y, z};
                KvcEmuBlock block(bx);
                kvc_emu_block = &block;
                for (unsigned t = 0; t < bx; ++t) {
                    Fiber& f = fibers[t];
                    f.tid = t;
                    f.done = false;
                    getcontext(&f.ctx);
                    f.ctx.uc_stack.ss_sp = f.stack.data();
                    f.ctx.uc_stack.ss_size = f.stack.size();
                    f.ctx.uc_link = nullptr;
                    makecontext(&f.ctx, fiber_main, 0);
                }
                for (unsigned left = bx; left > 0;) {  // round robin until every thread has finished
                    for (Fiber& f : fibers) {
                        if (f.done) continue;
                        g_current = &f;
                        threadIdx = dim3{f.tid, 0, 0};
                        swapcontext(&g_scheduler, &f.ctx);
                        if (f.done) --left;
                    }
                }
                kvc_emu_block = nullptr;
            }
    return 0;
}
