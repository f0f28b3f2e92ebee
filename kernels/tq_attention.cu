// Attention straight from TurboQuant-mse packed codes, without materialising K_hat or V_hat.
//
// k_hat_t = |k_t| Pi^T c[idx_t], so <q, k_hat_t> = |k_t| <Pi q, c[idx_t]>: the host rotates the
// queries once (q_rot = Pi q), and tq_score reads only the packed codes (bits/8 bytes per entry)
// and the float16 norms. For values, sum_t w_t v_hat_t = Pi^T sum_t (w_t |v_t|) c[idx_t]: tq_value
// accumulates in the rotated domain and the host applies Pi^T once per query row.
//
// Both kernels are rotation-agnostic (Haar or Hadamard, any D that is a multiple of 8, <= 256): the
// rotation is applied by the host. Layout as in turboquant.cu: TPR = D / 8 lanes per key row, 8
// consecutive codes (`bits` bytes) per lane. Sums are float32 in a fixed order (deterministic run to
// run), but not in the order of a torch matmul: agreement with the reference is to float tolerance.

#include "kvc_common.cuh"

#define KVC_SCORE_KT 64   // keys per block
#define KVC_SCORE_QC 16   // queries per block (grid.z covers more)
#define KVC_VALUE_QV 4    // queries accumulated in registers per block (grid.z covers more)

// logits[b, i, t] = |k_bt| * sum_j q_rot[b, i, j] * c[idx_btj]
extern "C" __global__ void tq_score(
    const float* __restrict__ q_rot,     // [B, nq, D] rotated queries
    int nq,
    const kvc_u8* __restrict__ packed,   // keys [B, T, D], packed codes
    const kvc_u16* __restrict__ norms16, // [B, T]
    const float* __restrict__ codebook,  // [2^bits]
    int D, int bits, kvc_i64 T,
    float* __restrict__ out)             // [B, nq, T]
{
    __shared__ float4 s_q4[KVC_SCORE_QC * 64];  // [QC][D] with D <= 256
    __shared__ float s_out[KVC_SCORE_QC][KVC_SCORE_KT];
    __shared__ float s_cb[16];

    const int tpr = D >> 3;
    const int groups = blockDim.x / tpr;
    const int group = threadIdx.x / tpr;
    const int t = threadIdx.x - group * tpr;
    const kvc_i64 b = blockIdx.y;
    const int q0 = blockIdx.z * KVC_SCORE_QC;
    const int nqb = min(KVC_SCORE_QC, nq - q0);
    const kvc_i64 k0 = (kvc_i64)blockIdx.x * KVC_SCORE_KT;
    const kvc_u32 mask = (1u << bits) - 1u;

    if (threadIdx.x < (1 << bits)) s_cb[threadIdx.x] = codebook[threadIdx.x];
    const float* qsrc = q_rot + (b * nq + q0) * D;
    float* s_q = reinterpret_cast<float*>(s_q4);
    for (int i = threadIdx.x; i < nqb * D; i += blockDim.x) s_q[i] = qsrc[i];
    __syncthreads();

    for (int kk = group; kk < KVC_SCORE_KT; kk += groups) {  // uniform trip count per warp
        const kvc_i64 key = k0 + kk;
        const bool valid = key < T;
        float y[8];
        float nrm = 0.0f;
        kvc_u32 chunk = 0;
        if (valid) {
            chunk = kvc_load_chunk8(packed + ((b * T + key) * tpr + t) * bits, bits);
            nrm = kvc_h2f(norms16[b * T + key]);
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) y[e] = s_cb[(chunk >> (e * bits)) & mask];
        for (int i = 0; i < nqb; ++i) {
            const float4* qa = reinterpret_cast<const float4*>(s_q + i * D + t * 8);
            float4 a = qa[0], c = qa[1];
            float p = a.x * y[0];
            p = fmaf(a.y, y[1], p); p = fmaf(a.z, y[2], p); p = fmaf(a.w, y[3], p);
            p = fmaf(c.x, y[4], p); p = fmaf(c.y, y[5], p); p = fmaf(c.z, y[6], p); p = fmaf(c.w, y[7], p);
            for (int m = 1; m < tpr; m <<= 1) p += __shfl_xor_sync(KVC_FULL_MASK, p, m);
            if (t == 0) s_out[i][kk] = p * nrm;
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < nqb * KVC_SCORE_KT; idx += blockDim.x) {
        const int i = idx / KVC_SCORE_KT, kk = idx - i * KVC_SCORE_KT;
        if (k0 + kk < T) out[(b * nq + q0 + i) * T + k0 + kk] = s_out[i][kk];
    }
}

// partial[b, chunk, i, j] = sum over the chunk's keys t of (w[b, i, t] |v_bt|) c[idx_btj]
// (rotated domain). The host sums the chunks and applies Pi^T.
extern "C" __global__ void tq_value(
    const float* __restrict__ w,         // [B, nq, T] attention weights
    int nq,
    const kvc_u8* __restrict__ packed,   // values [B, T, D], packed codes
    const kvc_u16* __restrict__ norms16, // [B, T]
    const float* __restrict__ codebook,  // [2^bits]
    int D, int bits, kvc_i64 T,
    int keys_per_chunk,
    float* __restrict__ partial)         // [B, n_chunks, nq, D]
{
    __shared__ float s_acc[KVC_VALUE_QV * 8 * 256];  // [groups][QV][D], groups * D = 8 * blockDim
    __shared__ float s_cb[16];

    const int tpr = D >> 3;
    const int groups = blockDim.x / tpr;
    const int group = threadIdx.x / tpr;
    const int t = threadIdx.x - group * tpr;
    const kvc_i64 b = blockIdx.y;
    const int q0 = blockIdx.z * KVC_VALUE_QV;
    const int nqb = min(KVC_VALUE_QV, nq - q0);
    const kvc_i64 c0 = (kvc_i64)blockIdx.x * keys_per_chunk;
    const kvc_i64 c1 = min(c0 + (kvc_i64)keys_per_chunk, T);
    const kvc_u32 mask = (1u << bits) - 1u;

    if (threadIdx.x < (1 << bits)) s_cb[threadIdx.x] = codebook[threadIdx.x];
    __syncthreads();

    float acc[KVC_VALUE_QV][8];
#pragma unroll
    for (int i = 0; i < KVC_VALUE_QV; ++i)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[i][e] = 0.0f;

    for (kvc_i64 key = c0 + group; key < c1; key += groups) {
        const kvc_u32 chunk = kvc_load_chunk8(packed + ((b * T + key) * tpr + t) * bits, bits);
        const float nrm = kvc_h2f(norms16[b * T + key]);
        float y[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) y[e] = s_cb[(chunk >> (e * bits)) & mask];
#pragma unroll
        for (int i = 0; i < KVC_VALUE_QV; ++i) {
            if (i < nqb) {
                const float wn = w[(b * nq + q0 + i) * T + key] * nrm;
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[i][e] = fmaf(wn, y[e], acc[i][e]);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < KVC_VALUE_QV; ++i)
#pragma unroll
        for (int e = 0; e < 8; ++e) s_acc[(group * KVC_VALUE_QV + i) * D + t * 8 + e] = acc[i][e];
    __syncthreads();
    float* dst = partial + ((b * gridDim.x + blockIdx.x) * nq + q0) * D;
    for (int idx = threadIdx.x; idx < nqb * D; idx += blockDim.x) {
        float s = 0.0f;
        for (int g = 0; g < groups; ++g) s += s_acc[g * KVC_VALUE_QV * D + idx];  // fixed order
        dst[idx] = s;
    }
}
