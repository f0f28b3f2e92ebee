// TurboQuant-mse encode and decode (kvc.quant.turboquant.tq_mse_encode / tq_mse_decode followed by
// kvc.quant.packing.pack_codes / preceded by unpack_codes), one pass over the data.
//
// Layout: a row (one token vector of D floats) is handled by TPR = D / 8 consecutive lanes, each
// holding 8 consecutive elements (j = t * 8 + e): two float4 loads, and the 8 codes of a thread are
// exactly `bits` bytes of the packed stream (code i of a row at stream bit i * bits, little endian),
// so packing is one store of `bits` bytes per thread with no atomics and no shared staging.
// Blocks have ROWS_PER_BLOCK * TPR threads (256 when TPR divides 256).
//
// rotate = 1 (randomized Hadamard, D a power of two in 8..256; TPR divides 32 so a row stays in one
// warp): per-row norm (warp shuffles), x / norm, signs, fast Walsh-Hadamard transform (3 levels in
// registers + log2(TPR) levels across lanes), the 1/sqrt(D) scale, nearest centroid, pack.
// rotate = 0: the input rows are already the rotated unit vectors y = Pi(x/|x|) (Haar rotation by a
// GEMM, or a Hadamard of a non-power-of-two size, done by torch); the kernel only quantizes and
// packs, and any D that is a multiple of 8 (up to 2048) works.

#include "kvc_common.cuh"

extern "C" __global__ void tq_encode(
    const float* __restrict__ x,      // rows of D floats; row r starts at x + r * ld
    kvc_i64 ld,                       // row stride in elements (multiple of 4; x 16-byte aligned)
    kvc_i64 n_rows,
    int D,                            // multiple of 8; a power of two <= 256 when rotate
    int bits,                         // 1..4
    int rotate,
    const float* __restrict__ signs,  // [D] +-1 (rotate)
    float hscale, int hdiv,           // final 1/sqrt(D) step: y * hscale (hdiv 0) or y / hscale (1)
    const float* __restrict__ mids,   // [2^bits - 1] decision midpoints (float32, as torch forms them)
    const float* __restrict__ norm_in,  // optional [n_rows] float32 norms (nullptr: computed here)
    kvc_u8* __restrict__ packed,      // [n_rows * D * bits / 8]
    kvc_u16* __restrict__ norms16,    // [n_rows] float16 norms (rotate)
    int* __restrict__ flag)           // |= 1 when a norm is NaN/Inf or above 65504
{
    __shared__ float s_mids[16];
    const int n_mids = (1 << bits) - 1;
    if (threadIdx.x < n_mids) s_mids[threadIdx.x] = mids[threadIdx.x];
    __syncthreads();

    const int tpr = D >> 3;
    const int group = threadIdx.x / tpr;
    const int t = threadIdx.x - group * tpr;
    const kvc_i64 row = (kvc_i64)blockIdx.x * (blockDim.x / tpr) + group;
    const bool valid = row < n_rows;

    float v[8];
    if (valid) {
        const float4* src = reinterpret_cast<const float4*>(x + row * ld + t * 8);
        float4 a = src[0], b = src[1];
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
        v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = 0.0f;
    }

    if (rotate) {
        // ||x||: not bit-identical to torch's reduction order (no two reductions are); see docs/gpu.md
        float ss = 0.0f;
#pragma unroll
        for (int e = 0; e < 8; ++e) ss = fmaf(v[e], v[e], ss);
        for (int m = 1; m < tpr; m <<= 1) ss = __fadd_rn(ss, __shfl_xor_sync(KVC_FULL_MASK, ss, m));
        float nrm = (norm_in != nullptr && valid) ? norm_in[row] : __fsqrt_rn(ss);
        if (valid && t == 0) {
            norms16[row] = kvc_f2h(nrm);
            if (!(nrm <= KVC_FP16_MAX)) atomicOr(flag, 1);
        }
        // unit = x / where(norm > 0, norm, 1); z = unit * signs
        const float div = nrm > 0.0f ? nrm : 1.0f;
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = __fmul_rn(__fdiv_rn(v[e], div), signs[t * 8 + e]);
        kvc_fwht8(v, t, tpr);
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = kvc_scalar_div(v[e], hscale, hdiv);
    }

    if (valid) {
        kvc_u32 chunk = 0;
#pragma unroll
        for (int e = 0; e < 8; ++e) chunk |= (kvc_u32)kvc_bucket(v[e], s_mids, bits) << (e * bits);
        kvc_store_chunk8(packed + (row * tpr + t) * bits, chunk, bits);
    }
}

extern "C" __global__ void tq_decode(
    const kvc_u8* __restrict__ packed,  // [n_rows * D * bits / 8]
    kvc_i64 n_rows,
    int D, int bits,
    const float* __restrict__ codebook,  // [2^bits] float32
    int rotate,                          // 1: inverse Hadamard, signs, norm; 0: centroids only
    const float* __restrict__ signs,     // [D] (rotate)
    float hscale, int hdiv,
    const kvc_u16* __restrict__ norms16, // [n_rows] (rotate)
    float* __restrict__ out,             // rows of D floats at out + r * ldo
    kvc_i64 ldo)
{
    __shared__ float s_cb[16];
    if (threadIdx.x < (1 << bits)) s_cb[threadIdx.x] = codebook[threadIdx.x];
    __syncthreads();

    const int tpr = D >> 3;
    const int group = threadIdx.x / tpr;
    const int t = threadIdx.x - group * tpr;
    const kvc_i64 row = (kvc_i64)blockIdx.x * (blockDim.x / tpr) + group;
    const bool valid = row < n_rows;
    const kvc_u32 mask = (1u << bits) - 1u;

    float v[8];
    kvc_u32 chunk = valid ? kvc_load_chunk8(packed + (row * tpr + t) * bits, bits) : 0u;
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = s_cb[(chunk >> (e * bits)) & mask];

    if (rotate) {
        // tq_mse_decode: Pi^T y = fwht(y) * signs, then * norm (float16 -> float32)
        kvc_fwht8(v, t, tpr);
        const float nrm = valid ? kvc_h2f(norms16[row]) : 0.0f;
#pragma unroll
        for (int e = 0; e < 8; ++e)
            v[e] = __fmul_rn(__fmul_rn(kvc_scalar_div(v[e], hscale, hdiv), signs[t * 8 + e]), nrm);
    }

    if (valid) {
        float4* dst = reinterpret_cast<float4*>(out + row * ldo + t * 8);
        dst[0] = make_float4(v[0], v[1], v[2], v[3]);
        dst[1] = make_float4(v[4], v[5], v[6], v[7]);
    }
}
