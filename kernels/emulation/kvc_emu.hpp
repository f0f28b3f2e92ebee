// CPU emulation of the small CUDA subset the kvc kernels use, so that the *same* kernel sources can
// be compiled with g++ and executed here (tests, and machines without a GPU). Not a simulator of
// performance or of memory-model corner cases: blocks run one after another, __syncthreads is a
// block barrier and __shfl_xor_sync a warp barrier + exchange.
//
// What it checks: indexing, the butterfly order of the Walsh-Hadamard transform, the bit layout of
// the packing, the float16 rounding helpers and every float operation (x86-64 SSE float arithmetic
// is IEEE-754 binary32 with round-to-nearest, like the __f*_rn intrinsics; compiled with
// -ffp-contract=off like --fmad=false). What it cannot check: PTX-level behaviour (the cvt
// instructions are replaced by _Float16 conversions), real warp scheduling, alignment faults.
// Every CUDA thread is a fiber (ucontext) on one OS thread, see KvcEmuBlock below.

#ifndef KVC_EMU_HPP
#define KVC_EMU_HPP

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <math.h>
#include <vector>

#define KVC_EMULATE 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static  // one block at a time: function-static storage is the block's shared memory

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }

extern dim3 threadIdx, blockIdx, blockDim, gridDim;

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, sizeof f);
    return f;
}
template <class T>
inline T min(T a, T b) { return b < a ? b : a; }
inline int atomicOr(int* p, int v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }

inline unsigned short kvc_emu_f2h(float f) {
    _Float16 h = (_Float16)f;  // round to nearest even (libgcc __truncsfhf2)
    unsigned short u;
    std::memcpy(&u, &h, sizeof u);
    return u;
}
inline float kvc_emu_h2f(unsigned short u) {
    _Float16 h;
    std::memcpy(&h, &u, sizeof h);
    return (float)h;
}

// Cooperative scheduling: every CUDA thread of a block is a fiber (ucontext) on one OS thread; a
// barrier yields until all of its participants have arrived. Blocks run one after another.
struct KvcEmuBarrier {
    unsigned needed = 0, arrived = 0, generation = 0;
};

void kvc_emu_yield();

inline void kvc_emu_wait(KvcEmuBarrier& b) {
    const unsigned gen = b.generation;
    if (++b.arrived == b.needed) {
        b.arrived = 0;
        ++b.generation;
        return;
    }
    while (b.generation == gen) kvc_emu_yield();
}

inline void kvc_emu_drop(KvcEmuBarrier& b) {  // a finished thread leaves the barrier
    --b.needed;
    if (b.arrived > 0 && b.arrived == b.needed) {
        b.arrived = 0;
        ++b.generation;
    }
}

struct KvcEmuBlock {
    explicit KvcEmuBlock(unsigned threads) : slots(threads) {
        block_barrier.needed = threads;
        for (unsigned w = 0; w * 32 < threads; ++w) {
            KvcEmuBarrier b;
            b.needed = threads - w * 32 < 32 ? threads - w * 32 : 32;
            warp_barriers.push_back(b);
        }
    }
    KvcEmuBarrier block_barrier;
    std::vector<KvcEmuBarrier> warp_barriers;
    std::vector<float> slots;
};
extern KvcEmuBlock* kvc_emu_block;

inline void __syncthreads() { kvc_emu_wait(kvc_emu_block->block_barrier); }

inline float __shfl_xor_sync(unsigned /*mask*/, float v, int m) {
    const unsigned t = threadIdx.x, w = t / 32, lane = t % 32;
    kvc_emu_block->slots[t] = v;
    kvc_emu_wait(kvc_emu_block->warp_barriers[w]);
    const float r = kvc_emu_block->slots[w * 32 + (lane ^ (unsigned)m)];
    kvc_emu_wait(kvc_emu_block->warp_barriers[w]);
    return r;
}

#endif  // KVC_EMU_HPP
