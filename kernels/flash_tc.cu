// Tensor-core flash-attention forward (FlashAttention-2 style) for sm_80+; same semantics and arguments
// as flash_attention_d{D}_{f16,bf16} in attention.cu, which stays the reference / fallback path:
//   flash_tc_d{D}_{f16,bf16}(q, k, v, out, heads, lq, lk, sq, sk, sv, so, scale, causal)
//   out[b, r, h·D + :] = Σ_j softmax_j(scale · q_r·k_j) v_j   (fp32 scores / accumulators; causal masks j > r;
//   a row whose keys are all masked writes 0).
//
// Launch contract (the Rust host mirrors it; constants in namespace ftc below):
//   grid  = (ceil(lq / 64), B * heads)          blockIdx.y = b * heads + h
//   block = 128 threads (4 warps × 16 query rows = 64 query rows per block)
//   dynamic shared memory = 4 * BC * PITCH * 2 bytes, with
//       DP = round_up(D, 16), PITCH = DP + 8 (halves), BC = key tile rows = (D <= 128 ? 64 : 32)
//       D=40: 28672   D=64: 36864   D=80: 45056   D=128: 69632   D=160: 43008
//   The host sets cudaFuncAttributeMaxDynamicSharedMemorySize to that value (needed above 48 KiB).
// Preconditions (checked by the host, which otherwise launches the reference kernel):
//   q, k, v, out 16-byte aligned; sq, sk, sv, so multiples of 8 elements; D multiple of 8 (all five are).
//   Then every row segment of D elements is a whole number of 16-byte chunks moved with cp.async.
//
// Structure: each warp owns 16 query rows; Q is loaded once into registers as mma A fragments. K/V tiles of
// BC keys are double buffered in shared memory (cp.async for tile j+1 in flight while tile j is computed).
// S = Q·Kᵀ with mma.m16n8k16 (fp32 accumulate), online softmax in fp32 (exp2 with scale·log2 e folded in),
// then P (converted to T, kept in registers: the m16n8 accumulator layout of two adjacent n-tiles is exactly
// the m16n8k16 A fragment) times V, fetched with ldmatrix.trans.
// Shared memory: [K buf0][V buf0][K buf1][V buf1], each BC rows × PITCH. Q (64 rows) is staged in buffer 1
// (2·BC ≥ 64 rows) before the first tile-1 load, since it is only read once into registers.
// Rows are padded from D to DP (multiple of 16, the mma k) with zero columns, written once (cp.async only
// writes the first D columns), and skewed by 8 halves so the 8 row addresses of an ldmatrix hit distinct banks.
#include "tensor_core.cuh"

namespace ftc {
constexpr int BR = 64;        // query rows per block
constexpr int WARPS = 4;      // 16 query rows per warp
constexpr int THREADS = WARPS * 32;
template <int D> struct Cfg {
    static constexpr int DP = (D + 15) / 16 * 16;        // head dim padded to the mma k
    static constexpr int PITCH = DP + 8;                 // smem row pitch in halves (odd count of 16 B units)
    static constexpr int BC = D <= 128 ? 64 : 32;        // key tile rows (32 at D=160 keeps registers < 255)
    static constexpr int SMEM_BYTES = 4 * BC * PITCH * 2;
    static_assert(2 * BC >= BR, "Q is staged in buffer 1");
    static_assert(D % 8 == 0, "16-byte cp.async chunks");
    static_assert(SMEM_BYTES <= 160 * 1024, "sm_80 limit");
};
}  // namespace ftc

using namespace tc;

template <typename T, int D>
__device__ __forceinline__ void flash_tc(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                         T* __restrict__ out, int heads, int lq, int lk, long sq, long sk, long sv,
                                         long so, float scale, int causal) {
    using C = ftc::Cfg<D>;
    constexpr int DP = C::DP, PITCH = C::PITCH, BC = C::BC, BR = ftc::BR, NT = ftc::THREADS;
    constexpr int KD = DP / 16;  // k-steps of Q·Kᵀ over the head dim
    constexpr int NS = BC / 8;   // score n-tiles (8 keys each)
    constexpr int NO = DP / 8;   // output n-tiles (8 dims each)
    constexpr int CH = D / 8;    // 16-byte chunks per row
    constexpr int TILE = BC * PITCH;

    extern __shared__ __align__(16) unsigned char ftc_smem[];
    T* sm = reinterpret_cast<T*>(ftc_smem);
    T* qs = sm + 2 * TILE;  // Q staged in buffer 1

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;  // mma fragment row group / thread-in-group
    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int row0 = blockIdx.x * BR;
    const int wrow = row0 + warp * 16;  // this warp's first query row
    const T* qb = q + (long)b * lq * sq + (long)h * D;
    const T* kb = k + (long)b * lk * sk + (long)h * D;
    const T* vb = v + (long)b * lk * sv + (long)h * D;
    T* ob = out + (long)b * lq * so + (long)h * D;

    // Zero the padding columns D..DP of every row once (ldmatrix reads them; garbage could be NaN/Inf).
    if constexpr (DP > D) {
        for (int i = tid; i < 4 * BC * (DP - D); i += NT) {
            int r = i / (DP - D), c = D + i % (DP - D);
            sm[r * PITCH + c] = from_f<T>(0.0f);
        }
    }
    // Rows first..first+nrows-1 of src (row stride `stride`) into dst; rows >= limit are zero-filled
    // (their source address is clamped to row 0, which exists whenever this is called, and not read).
    auto load_rows = [&](T* dst, const T* src, long stride, int first, int nrows, int limit) {
        for (int i = tid; i < nrows * CH; i += NT) {
            int r = i / CH, c = (i % CH) * 8, row = first + r;
            bool ok = row < limit;
            cp_async16(smem_addr(dst + r * PITCH + c), src + (ok ? (long)row * stride : 0L) + c, ok);
        }
    };

    const int last_row = min(row0 + BR, lq) - 1;
    const int key_end = causal ? min(lk, last_row + 1) : lk;  // causal: no key past the block's last row
    const int ntiles = (key_end + BC - 1) / BC;

    load_rows(qs, qb, sq, row0, BR, lq);
    cp_async_commit();
    if (ntiles > 0) {
        load_rows(sm, kb, sk, 0, BC, lk);
        load_rows(sm + TILE, vb, sv, 0, BC, lk);
    }
    cp_async_commit();
    cp_async_wait<1>();  // Q landed (tile 0 may still be in flight)
    __syncthreads();
    uint32_t qf[KD][4];  // A fragments: matrices (rows 0-7|8-15) × (cols 0-7|8-15) of each 16-wide k-step
#pragma unroll
    for (int kk = 0; kk < KD; ++kk)
        ldsm_x4(qf[kk], smem_addr(qs + (warp * 16 + (lane & 15)) * PITCH + kk * 16 + (lane >> 4) * 8));
    __syncthreads();  // everyone has read Q before tile 1 overwrites buffer 1

    float o[NO][4];
#pragma unroll
    for (int n = 0; n < NO; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY};  // running max (log2 domain) of rows g and g+8
    float l[2] = {0.0f, 0.0f};            // this thread's partial row sums; quad-reduced at the end
    const float sl2 = scale * 1.44269504088896341f;

    for (int j = 0; j < ntiles; ++j) {
        const int k0 = j * BC;
        if (j + 1 < ntiles) {
            T* nk = sm + ((j + 1) & 1) * 2 * TILE;
            load_rows(nk, kb, sk, k0 + BC, BC, lk);
            load_rows(nk + TILE, vb, sv, k0 + BC, BC, lk);
        }
        cp_async_commit();   // always commit (maybe empty) so the group count stays uniform
        cp_async_wait<1>();  // tile j landed
        __syncthreads();
        const T* ks = sm + (j & 1) * 2 * TILE;
        const T* vs = ks + TILE;

        // Skip warps whose rows are all past lq, or (causal) all before this tile's first key.
        if (wrow < lq && !(causal && k0 > wrow + 15)) {
            // S = Q·Kᵀ. K rows are keys with d contiguous = the col-major B operand: no transpose. One x4 gives
            // (keys n..n+7 | n+8..n+15) × (d k..k+7 | k+8..k+15) = b0,b1 of two adjacent n-tiles.
            float s[NS][4];
#pragma unroll
            for (int n = 0; n < NS; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < KD; ++kk) {
#pragma unroll
                for (int np = 0; np < NS / 2; ++np) {
                    uint32_t bf[4];
                    ldsm_x4(bf, smem_addr(ks + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * PITCH + kk * 16 +
                                          ((lane >> 3) & 1) * 8));
                    Mma<T>::run(s[2 * np], qf[kk], bf[0], bf[1]);
                    Mma<T>::run(s[2 * np + 1], qf[kk], bf[2], bf[3]);
                }
            }
            // Scale into the log2 domain; mask keys past lk and (causal) after the row. s[n][e] is row
            // g + 8(e/2), key k0 + 8n + 2t + e%2.
            const bool edge = (k0 + BC > lk) || (causal && k0 + BC - 1 > wrow);
            float mx[2] = {m[0], m[1]};
#pragma unroll
            for (int n = 0; n < NS; ++n) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float x = s[n][e] * sl2;
                    if (edge) {
                        int key = k0 + n * 8 + 2 * t + (e & 1), row = wrow + g + (e >> 1) * 8;
                        if (key >= lk || (causal && key > row)) x = -INFINITY;
                    }
                    s[n][e] = x;
                    mx[e >> 1] = fmaxf(mx[e >> 1], x);
                }
            }
            // Row max over the 4 threads of a quad (they share rows g, g+8), then rescale the running state.
            float mu[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
                mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
                mu[i] = mx[i] == -INFINITY ? 0.0f : mx[i];  // all masked so far: exp2(-inf - 0) = 0, no NaN
                float corr = exp2f(m[i] - mu[i]);           // m = -inf -> 0 (l and o are 0 anyway)
                m[i] = mx[i];
                l[i] *= corr;
#pragma unroll
                for (int n = 0; n < NO; ++n) {
                    o[n][2 * i] *= corr;
                    o[n][2 * i + 1] *= corr;
                }
            }
            // O += P·V, 16 keys per k-step. P's A fragment is the S accumulators of n-tiles 2kk, 2kk+1:
            // a0 = (g, 2t..) of tile 2kk, a1 = (g+8, ..) of 2kk, a2/a3 the same of tile 2kk+1.
            // V rows are keys with d contiguous (row-major B), so ldmatrix.trans; one x4 gives
            // (keys kk..+7 | +8..+15) × (d n..n+7 | n+8..n+15) = b0,b1 of two adjacent output n-tiles.
#pragma unroll
            for (int kk = 0; kk < BC / 16; ++kk) {
                uint32_t pa[4];
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    const float* sv4 = s[2 * kk + half];
                    float p0 = exp2f(sv4[0] - mu[0]), p1 = exp2f(sv4[1] - mu[0]);
                    float p2 = exp2f(sv4[2] - mu[1]), p3 = exp2f(sv4[3] - mu[1]);
                    l[0] += p0 + p1;
                    l[1] += p2 + p3;
                    pa[2 * half] = Mma<T>::pack2(p0, p1);
                    pa[2 * half + 1] = Mma<T>::pack2(p2, p3);
                }
#pragma unroll
                for (int dp = 0; dp < DP / 16; ++dp) {
                    uint32_t bf[4];
                    ldsm_x4_t(bf, smem_addr(vs + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * PITCH + dp * 16 +
                                            (lane >> 4) * 8));
                    Mma<T>::run(o[2 * dp], pa, bf[0], bf[1]);
                    Mma<T>::run(o[2 * dp + 1], pa, bf[2], bf[3]);
                }
            }
        }
        __syncthreads();  // tile j's buffer is reloaded (with tile j+2) in the next iteration
    }

    // Normalise and store rows g, g+8 of this warp: 2 elements (32 bits) per n-tile, first D columns only.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
        const int row = wrow + g + 8 * i;
        if (row >= lq) continue;
        const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
        T* orow = ob + (long)row * so + 2 * t;
#pragma unroll
        for (int n = 0; n < NO; ++n) {
            if (n * 8 >= D) continue;  // padding tile (D = 40 only); D % 8 == 0 so tiles are whole
            *reinterpret_cast<uint32_t*>(orow + n * 8) = Mma<T>::pack2(o[n][2 * i] * inv, o[n][2 * i + 1] * inv);
        }
    }
}

#define FLASH_TC(S, T, D)                                                                                     \
    extern "C" __global__ void __launch_bounds__(ftc::THREADS)                                                \
        flash_tc_d##D##_##S(const T* q, const T* k, const T* v, T* out, int heads, int lq, int lk, long sq,   \
                            long sk, long sv, long so, float scale, int causal) {                             \
        flash_tc<T, D>(q, k, v, out, heads, lq, lk, sq, sk, sv, so, scale, causal);                           \
    }
// Head dims from kernels/dims.rs (build.rs defines TOFFEE_FLASH_DIMS).
#define FLASH_TC_ALL(S, T) TOFFEE_FLASH_DIMS(FLASH_TC, S, T)
TOFFEE_INSTANTIATE(FLASH_TC_ALL)
