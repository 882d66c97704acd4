// Flash-attention forward (online softmax, never materialising the score matrix) on packed heads:
// q [B, Lq, H·D], k/v [B, Lk, H·D] with arbitrary row strides, out [B, Lq, H·D]; fp16/bf16 in and out,
// fp32 scores and accumulators. Instantiated for the head dims the models use: 40, 80, 160 (SD1.x),
// 64 (SD2.x, SDXL, CLIP-L), 128. `causal` masks keys after the query (CLIP text encoder).
//
// Correct first: a block of 4 warps takes 16 query rows of one (batch, head); key/value tiles of 32
// rows are staged in shared memory (row pitch D+2 halves: an odd word count, so lane i reading row i
// hits bank i); each lane scores one key of the tile, then owns D/32 output dims for the P·V update.
#include "common.cuh"

#define ROWS_PER_WARP 4
#define WARPS 4
#define KT 32

template <typename T, int D>
__device__ void flash_fwd(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                          T* __restrict__ out, int heads, int lq, int lk, long sq, long sk, long sv, long so,
                          float scale, int causal) {
    constexpr int P = D + 2;            // smem row pitch
    constexpr int DJ = (D + 31) / 32;   // output dims per lane
    __shared__ T ks[KT * P];
    __shared__ T vs[KT * P];
    __shared__ float qs[WARPS * ROWS_PER_WARP][D];

    int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int row0 = blockIdx.x * WARPS * ROWS_PER_WARP;
    const T* qb = q + (long)b * lq * sq + h * D;
    const T* kb = k + (long)b * lk * sk + h * D;
    const T* vb = v + (long)b * lk * sv + h * D;
    T* ob = out + (long)b * lq * so + h * D;

    const float sl2 = scale * 1.44269504088896341f;  // fold log2(e): exp2 below
    for (int i = threadIdx.x; i < WARPS * ROWS_PER_WARP * D; i += blockDim.x) {
        int r = i / D, d = i % D;
        int row = row0 + r;
        qs[r][d] = row < lq ? to_f(qb[(long)row * sq + d]) * sl2 : 0.0f;
    }
    float m[ROWS_PER_WARP], l[ROWS_PER_WARP], acc[ROWS_PER_WARP][DJ];
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; ++r) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
#pragma unroll
        for (int j = 0; j < DJ; ++j) acc[r][j] = 0.0f;
    }
    int last_row = min(row0 + WARPS * ROWS_PER_WARP, lq) - 1;
    int key_end = causal ? min(lk, last_row + 1) : lk;
    for (int k0 = 0; k0 < key_end; k0 += KT) {
        __syncthreads();
        for (int i = threadIdx.x; i < KT * D; i += blockDim.x) {
            int r = i / D, d = i % D;
            int key = k0 + r;
            ks[r * P + d] = key < lk ? kb[(long)key * sk + d] : from_f<T>(0.0f);
            vs[r * P + d] = key < lk ? vb[(long)key * sv + d] : from_f<T>(0.0f);
        }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < ROWS_PER_WARP; ++r) {
            int qr = warp * ROWS_PER_WARP + r;
            int row = row0 + qr;
            if (row >= lq) continue;
            int key = k0 + lane;
            float s = 0.0f;
#pragma unroll 8
            for (int d = 0; d < D; ++d) s += qs[qr][d] * to_f(ks[lane * P + d]);
            bool valid = key < lk && (!causal || key <= row);
            s = valid ? s : -INFINITY;
            float mt = warp_max(s);
            float mn = fmaxf(m[r], mt);
            if (mn == -INFINITY) continue;  // every key so far masked
            float p = valid ? exp2f(s - mn) : 0.0f;
            float corr = exp2f(m[r] - mn);
            l[r] = l[r] * corr + warp_sum(p);
            m[r] = mn;
#pragma unroll
            for (int j = 0; j < DJ; ++j) acc[r][j] *= corr;
            for (int kk = 0; kk < KT; ++kk) {
                float pk = __shfl_sync(0xffffffffu, p, kk);
                if (pk == 0.0f) continue;
#pragma unroll
                for (int j = 0; j < DJ; ++j) {
                    int d = lane + 32 * j;
                    if (d < D) acc[r][j] += pk * to_f(vs[kk * P + d]);
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; ++r) {
        int row = row0 + warp * ROWS_PER_WARP + r;
        if (row >= lq) continue;
        float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
#pragma unroll
        for (int j = 0; j < DJ; ++j) {
            int d = lane + 32 * j;
            if (d < D) ob[(long)row * so + d] = from_f<T>(acc[r][j] * inv);
        }
    }
}

#define FLASH(S, T, D)                                                                                        \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                                 \
        flash_attention_d##D##_##S(const T* q, const T* k, const T* v, T* out, int heads, int lq, int lk,     \
                                   long sq, long sk, long sv, long so, float scale, int causal) {             \
        flash_fwd<T, D>(q, k, v, out, heads, lq, lk, sq, sk, sv, so, scale, causal);                         \
    }
// Head dims from kernels/dims.rs (build.rs defines TOFFEE_FLASH_DIMS).
#define FLASH_ALL(S, T) TOFFEE_FLASH_DIMS(FLASH, S, T)
TOFFEE_INSTANTIATE(FLASH_ALL)

// Any head dim (the VAE's single 512-wide head, tiny test models): scores materialised in fp32.
// Correct first and simple: S = scale·Q·Kᵀ, row softmax in place, O = P·V, one thread per output.
template <typename T>
__device__ void attn_scores(const T* q, const T* k, float* s, int heads, int lq, int lk, int d, long sq, long sk,
                            float scale, int causal) {
    int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < (long)lq * lk; i += (long)gridDim.x * blockDim.x) {
        int r = (int)(i / lk), c = (int)(i % lk);
        const T* qr = q + ((long)b * lq + r) * sq + h * d;
        const T* kc = k + ((long)b * lk + c) * sk + h * d;
        float acc = 0.0f;
        for (int j = 0; j < d; ++j) acc += to_f(qr[j]) * to_f(kc[j]);
        s[(long)bh * lq * lk + i] = (causal && c > r) ? -INFINITY : acc * scale;
    }
}

// One block per score row; probabilities to `out` (which may be `s` itself) in its storage type.
template <typename O>
__device__ void softmax_rows(float* s, O* out, int cols) {
    __shared__ float scratch[32];
    float* row = s + (long)blockIdx.x * cols;
    O* orow = out + (long)blockIdx.x * cols;
    float m = -INFINITY;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) m = fmaxf(m, row[i]);
    m = warp_max(m);
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = m;
    __syncthreads();
    int nw = (blockDim.x + 31) >> 5;
    m = threadIdx.x < nw ? scratch[threadIdx.x] : -INFINITY;
    if (threadIdx.x < 32) m = warp_max(m);
    __syncthreads();
    if (threadIdx.x == 0) scratch[0] = m;
    __syncthreads();
    m = scratch[0];
    __syncthreads();
    float sum = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        float e = row[i] == -INFINITY ? 0.0f : __expf(row[i] - m);
        row[i] = e;
        sum += e;
    }
    float total = block_sum(sum, scratch);
    float inv = total > 0.0f ? 1.0f / total : 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) orow[i] = from_f<O>(row[i] * inv);
}

template <typename T>
__device__ void attn_pv(const float* p, const T* v, T* out, int heads, int lq, int lk, int d, long sv, long so) {
    int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < (long)lq * d; i += (long)gridDim.x * blockDim.x) {
        int r = (int)(i / d), j = (int)(i % d);
        const float* pr = p + ((long)bh * lq + r) * lk;
        const T* vb = v + (long)b * lk * sv + h * d + j;
        float acc = 0.0f;
        for (int c = 0; c < lk; ++c) acc += pr[c] * to_f(vb[(long)c * sv]);
        out[((long)b * lq + r) * so + h * d + j] = from_f<T>(acc);
    }
}

#define ATTN_ANY(S, T)                                                                                         \
    extern "C" __global__ void attn_scores_##S(const T* q, const T* k, float* s, int heads, int lq, int lk,    \
                                               int d, long sq, long sk, float scale, int causal) {            \
        attn_scores<T>(q, k, s, heads, lq, lk, d, sq, sk, scale, causal);                                     \
    }                                                                                                         \
    extern "C" __global__ void attn_pv_##S(const float* p, const T* v, T* out, int heads, int lq, int lk,     \
                                           int d, long sv, long so) {                                         \
        attn_pv<T>(p, v, out, heads, lq, lk, d, sv, so);                                                      \
    }
TOFFEE_INSTANTIATE(ATTN_ANY)
extern "C" __global__ void softmax_rows_f32(float* s, int cols) { softmax_rows<float>(s, s, cols); }
// The GEMM attention path (wide heads): f32 scores in, probabilities in the storage type out.
#define SOFTMAX_TO(S, T) \
    extern "C" __global__ void softmax_rows_to_##S(float* s, T* p, int cols) { softmax_rows<T>(s, p, cols); }
TOFFEE_INSTANTIATE(SOFTMAX_TO)
