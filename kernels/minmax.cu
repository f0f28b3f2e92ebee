// Asymmetric min/max group quantization + bit packing (kvc.quant.uniform.minmax_quantize followed by
// kvc.quant.packing.pack_codes), and the inverse (unpack_codes + minmax_dequantize): KIVI (keys per
// channel in groups of G tokens, values per token in groups of G channels) and the int baseline.
//
// The quantized tensor is a logical [B, R, L] view with arbitrary element strides (sb, sr, sl), so
// KIVI's transposed keys (groups along tokens: sr = 1, sl = D) are read in place, coalesced across
// channels. Groups are G consecutive entries of the last (L) axis; one thread per group, two passes
// over its G entries (min/max, then codes; the second pass hits L1/L2). Codes are written in the
// C order of [B, R, L] as one little-endian bit stream, exactly as pack_codes does.
//
// Deterministic and bit-identical to the torch reference: min/max are exact, the float16 zero point
// is rounded down and the scale up (fp16_floor / fp16_ceil), and (x - z) / s, round-half-even and
// clamp are the same IEEE operations as torch's. Bad input (NaN, Inf, a value or a scale outside the
// float16 range) sets `flag`, and the host raises MethodFailure like the reference does.

#include "kvc_common.cuh"

extern "C" __global__ void minmax_quantize(
    const float* __restrict__ x,
    kvc_i64 B, kvc_i64 R, kvc_i64 L,   // logical shape; L % G == 0
    kvc_i64 sb, kvc_i64 sr, kvc_i64 sl,  // element strides of the logical view
    int G, int bits,                   // group size, 1..8 bits
    int r_fastest,                     // thread order: 1 = consecutive threads take consecutive r
    float lscale, int ldiv,            // (max - z) / (2^bits - 1) as torch computes it on this device
    int word_mode,                     // 1: G*bits and L*bits are multiples of 32 (u32 stores), 0: bytes
    kvc_u8* __restrict__ packed,       // ceil(B*R*L*bits/8) bytes
    kvc_u16* __restrict__ scale16,     // [B, R, L/G] float16
    kvc_u16* __restrict__ zero16,      // [B, R, L/G] float16
    int* __restrict__ flag)
{
    const kvc_i64 ng = L / G;
    const kvc_i64 idx = (kvc_i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= B * R * ng) return;
    kvc_i64 b, r, g;
    if (r_fastest) {
        r = idx % R;
        const kvc_i64 rest = idx / R;
        g = rest % ng;
        b = rest / ng;
    } else {
        g = idx % ng;
        const kvc_i64 rest = idx / ng;
        r = rest % R;
        b = rest / R;
    }
    const float* src = x + b * sb + r * sr + g * G * sl;
    const kvc_i64 lg = (b * R + r) * ng + g;  // logical group index (C order of [B, R, L/G])

    float mn = __int_as_float(0x7f800000), mx = -mn;
    bool bad = false;
    for (int i = 0; i < G; ++i) {
        const float v = src[i * sl];
        bad |= (v != v);
        mn = fminf(mn, v);
        mx = fmaxf(mx, v);
    }
    // zero = fp16_floor(min); scale = fp16_ceil((max - zero) / levels)
    bad |= !(fabsf(mn) <= KVC_FP16_MAX);
    const kvc_u16 z16 = bad ? (kvc_u16)0 : kvc_fp16_floor(mn);
    const float z = kvc_h2f(z16);
    const float q = kvc_scalar_div(__fsub_rn(mx, z), lscale, ldiv);
    bad |= !(fabsf(q) <= KVC_FP16_MAX);
    const kvc_u16 s16 = bad ? (kvc_u16)0 : kvc_fp16_ceil(q);
    const float s = kvc_h2f(s16);
    if (bad) atomicOr(flag, 1);
    scale16[lg] = s16;
    zero16[lg] = z16;

    const float levels = (float)((1 << bits) - 1);
    const kvc_u64 bit0 = (kvc_u64)lg * (kvc_u64)G * (kvc_u64)bits;
    kvc_u64 acc = 0;
    int nacc = 0;
    kvc_u32* wout = reinterpret_cast<kvc_u32*>(packed) + (bit0 >> 5);
    kvc_u8* bout = packed + (bit0 >> 3);
    for (int i = 0; i < G; ++i) {
        int code = 0;
        if (s > 0.0f) {
            // torch: round((x - z) / where(s > 0, s, 1)).clamp(0, levels), 0 where s == 0
            float c = rintf(__fdiv_rn(__fsub_rn(src[i * sl], z), s));
            c = fminf(fmaxf(c, 0.0f), levels);
            code = (int)c;
        }
        acc |= (kvc_u64)code << nacc;
        nacc += bits;
        if (word_mode) {
            if (nacc >= 32) { *wout++ = (kvc_u32)acc; acc >>= 32; nacc -= 32; }
        } else {
            while (nacc >= 8) { *bout++ = (kvc_u8)acc; acc >>= 8; nacc -= 8; }
        }
    }
}

// out[i] = code_i * scale[i / G] + zero[i / G] for the n entries of a C-ordered [..., L] tensor.
extern "C" __global__ void minmax_dequantize(
    const kvc_u8* __restrict__ packed,
    kvc_i64 n, int G, int bits,
    const kvc_u16* __restrict__ scale16,
    const kvc_u16* __restrict__ zero16,
    float* __restrict__ out)
{
    const kvc_u32 mask = (1u << bits) - 1u;
    for (kvc_i64 i = (kvc_i64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (kvc_i64)gridDim.x * blockDim.x) {
        const kvc_u64 bit = (kvc_u64)i * bits;
        const kvc_u64 byte = bit >> 3;
        const int shift = (int)(bit & 7);
        kvc_u32 word = packed[byte];
        if (shift + bits > 8) word |= (kvc_u32)packed[byte + 1] << 8;
        const float code = (float)((word >> shift) & mask);
        const kvc_i64 grp = i / G;
        out[i] = __fadd_rn(__fmul_rn(code, kvc_h2f(scale16[grp])), kvc_h2f(zero16[grp]));
    }
}
