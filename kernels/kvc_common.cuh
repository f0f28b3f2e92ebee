// Shared device helpers for the kvc kernels (included by every kernels/*.cu).
//
// Self-contained on purpose: no CUDA or C++ headers, so the same source compiles under NVRTC
// (cupy.RawModule at run time) and under nvcc (tests/test_kernels_compile.py). float16 values are
// handled as their 16-bit patterns (unsigned short) and converted with PTX cvt instructions.
//
// Bit-for-bit rules (see docs/gpu.md): every kernel is compiled with --fmad=false, and every
// floating-point step that the torch reference also performs is written with an explicit
// round-to-nearest intrinsic (__fadd_rn, __fmul_rn, __fdiv_rn, __fsqrt_rn) in the same order as the
// torch expression, so that the result is the same IEEE-754 operation sequence.

#ifndef KVC_COMMON_CUH
#define KVC_COMMON_CUH

#define KVC_FULL_MASK 0xffffffffu
#define KVC_FP16_MAX 65504.0f

typedef unsigned char kvc_u8;
typedef unsigned short kvc_u16;
typedef unsigned int kvc_u32;
typedef long long kvc_i64;
typedef unsigned long long kvc_u64;

// float -> float16 bits, round to nearest even (what torch's .to(torch.float16) does).
__device__ __forceinline__ kvc_u16 kvc_f2h(float f) {
#ifdef KVC_EMULATE  // CPU build of the kernels (kernels/emulation/)
    return kvc_emu_f2h(f);
#else
    kvc_u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#endif
}

// float16 bits -> float (exact).
__device__ __forceinline__ float kvc_h2f(kvc_u16 h) {
#ifdef KVC_EMULATE
    return kvc_emu_h2f(h);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#endif
}

// The next float16 below h (toward -inf); h is finite. Mirrors torch.nextafter(h, -inf).
__device__ __forceinline__ kvc_u16 kvc_h_next_down(kvc_u16 h) {
    if (h == 0x0000u) return (kvc_u16)0x8001u;  // +0 -> smallest negative subnormal
    if (h & 0x8000u) return (kvc_u16)(h + 1u);  // negative (and -0): larger magnitude
    return (kvc_u16)(h - 1u);                   // positive: smaller magnitude
}

// The largest float16 <= v (kvc.quant.uniform.fp16_floor); v must be finite and |v| <= 65504.
__device__ __forceinline__ kvc_u16 kvc_fp16_floor(float v) {
    kvc_u16 h = kvc_f2h(v);
    return kvc_h2f(h) > v ? kvc_h_next_down(h) : h;
}

// The smallest float16 >= v (kvc.quant.uniform.fp16_ceil = -fp16_floor(-v)).
__device__ __forceinline__ kvc_u16 kvc_fp16_ceil(float v) {
    return (kvc_u16)(kvc_fp16_floor(-v) ^ 0x8000u);
}

// x / s as torch computes "tensor / python_float" on this device: div_mode 1 is a true IEEE
// division by s; div_mode 0 multiplies by a reciprocal that the host computed the way torch does
// (torch's CUDA kernels replace division by a CPU scalar with a multiplication). The host detects
// which of the two (and which reciprocal) torch uses and passes `s` accordingly (kvc/gpu/ops.py).
__device__ __forceinline__ float kvc_scalar_div(float x, float s, int div_mode) {
    return div_mode ? __fdiv_rn(x, s) : __fmul_rn(x, s);
}

// Store the `bits` bytes of `chunk` (8 codes of `bits` bits, code e at bit e*bits) at p.
// p is aligned to `bits` bytes when bits is 1, 2 or 4 (callers guarantee it).
__device__ __forceinline__ void kvc_store_chunk8(kvc_u8* p, kvc_u32 chunk, int bits) {
    switch (bits) {
        case 1: *p = (kvc_u8)chunk; break;
        case 2: *reinterpret_cast<kvc_u16*>(p) = (kvc_u16)chunk; break;
        case 4: *reinterpret_cast<kvc_u32*>(p) = chunk; break;
        default:
            for (int i = 0; i < bits; ++i) p[i] = (kvc_u8)(chunk >> (8 * i));
    }
}

// Load the `bits` bytes of a chunk of 8 codes stored by kvc_store_chunk8.
__device__ __forceinline__ kvc_u32 kvc_load_chunk8(const kvc_u8* p, int bits) {
    switch (bits) {
        case 1: return (kvc_u32)*p;
        case 2: return (kvc_u32)*reinterpret_cast<const kvc_u16*>(p);
        case 4: return *reinterpret_cast<const kvc_u32*>(p);
        default: {
            kvc_u32 c = 0;
            for (int i = 0; i < bits; ++i) c |= (kvc_u32)p[i] << (8 * i);
            return c;
        }
    }
}

// Number of decision midpoints strictly below y (= torch.bucketize(y, mids, right=False), i.e. the
// nearest centroid with ties to the lower one). mids: 2^bits - 1 sorted values in shared memory.
__device__ __forceinline__ int kvc_bucket(float y, const float* mids, int bits) {
    int c = 0;
    for (int step = 1 << (bits - 1); step > 0; step >>= 1)
        if (mids[c + step - 1] < y) c += step;
    return c;
}

// One level of the Walsh-Hadamard butterfly across lanes: the partner is lane ^ m. The lane whose
// element index is lower keeps a + b, the upper one a - b (torch.stack((a + b, a - b)) in
// kvc.quant.rotation.fwht), with a the lower and b the upper element.
__device__ __forceinline__ float kvc_butterfly_lane(float v, int lane_bit_set, int m) {
    float p = __shfl_xor_sync(KVC_FULL_MASK, v, m);
    return lane_bit_set ? __fsub_rn(p, v) : __fadd_rn(v, p);
}

// Unnormalised fast Walsh-Hadamard transform of one row held as 8 consecutive elements per thread
// (element j = t * 8 + e) by `tpr` consecutive lanes; levels h = 1, 2, 4 inside the thread, then
// h = 8, 16, ... across lanes, in the same order as the torch reference.
__device__ __forceinline__ void kvc_fwht8(float v[8], int t, int tpr) {
#pragma unroll
    for (int h = 1; h < 8; h <<= 1) {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            if ((e & h) == 0) {
                float a = v[e], b = v[e + h];
                v[e] = __fadd_rn(a, b);
                v[e + h] = __fsub_rn(a, b);
            }
        }
    }
    for (int m = 1; m < tpr; m <<= 1) {
        int upper = (t & m) != 0;
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = kvc_butterfly_lane(v[e], upper, m);
    }
}

#endif  // KVC_COMMON_CUH
