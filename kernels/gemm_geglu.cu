// Tensor-core GEGLU input projection for sm_80+: the GEMM of a diffusers GEGLU fused with its gate, so the
// 2n-wide projection never goes to memory:
//   gemm_geglu_{f16,bf16}(x, w, bias, out, m, n, k)
//   out[r, j] = (x[r,:]·w[j,:] + bias[j]) * gelu(x[r,:]·w[n+j,:] + bias[n+j]),   r < m, j < n
//   x: [m, k], w: [2n, k] (PyTorch Linear weight: rows 0..n-1 value half, rows n..2n-1 gate half),
//   bias: [2n], out: [m, n], all row-major, contiguous, storage type T. fp32 accumulation; bias add and exact
//   erf GELU (gelu_f) in fp32 on the accumulators; the product is rounded once to T.
//
// Launch contract (the Rust host mirrors it; constants in namespace gg below):
//   grid  = (ceil(n / 64), ceil(m / 128))       blockIdx.x = 64-column tile of out, blockIdx.y = 128-row tile
//   block = 256 threads (8 warps as 4 (rows) × 2 (cols), each warp 32 rows × 32 columns of out)
//   shared memory: 40960 bytes, STATIC (no dynamic smem, no cudaFuncAttributeMaxDynamicSharedMemorySize).
//   __launch_bounds__(256, 2): at most 128 registers, so 2 blocks (16 warps, 80 KiB smem) fit on an SM.
// Preconditions (checked by the host, which otherwise uses cuBLASLt + the separate GEGLU kernel):
//   k % 8 == 0 (rows of x and w are whole 16-byte cp.async chunks), n % 8 == 0 (an 8-column mma tile is
//   entirely in or out of range; 32-bit stores stay aligned), x, w, bias, out 16-byte aligned, m, n, k >= 1.
//   m, n, k are otherwise arbitrary: out-of-range rows of x / w and columns past k are zero-filled in shared
//   memory (cp.async src-size 0), and stores are guarded by row < m, col < n.
//
// Structure: per block, the k loop walks 32-wide slices. Each slice stages x[128 rows], w value[64 rows] and
// w gate[64 rows] in shared memory, double buffered: the cp.async for slice s+1 is in flight while slice s is
// multiplied. Each warp keeps two accumulator sets (value and gate) for the same 32×32 output tile, i.e.
// 2 (m16) × 4 (n8) × 2 halves × 4 = 64 fp32 registers per thread; A (x) and B (w) fragments come from
// ldmatrix.x4. w rows are output columns with k contiguous, which is exactly the "col" B operand of
// mma.row.col: no transpose. Rows are skewed by 8 halves (pitch 40 halves = 80 B = 5 16-byte units, odd) so
// the 8 row addresses of one ldmatrix matrix hit 8 distinct 16-byte bank groups.
#include "tensor_core.cuh"

namespace gg {
constexpr int BM = 128, BN = 64, BK = 32;  // block tile: rows of out, columns of out, k slice
constexpr int WM = 32, WN = 32;            // warp tile
constexpr int WARPS_M = BM / WM, WARPS_N = BN / WN;
constexpr int THREADS = WARPS_M * WARPS_N * 32;  // 256
constexpr int MT = WM / 16, NT = WN / 8;         // m16 / n8 mma tiles per warp: 2 × 4
constexpr int PITCH = BK + 8;                    // smem row pitch in halves (80 B: odd count of 16 B units)
constexpr int CPR = BK / 8;                      // 16-byte chunks per smem row
constexpr int X_BYTES = BM * PITCH * 2;          // 10240
constexpr int W_BYTES = BN * PITCH * 2;          // 5120 (value; gate the same)
constexpr int STAGE_BYTES = X_BYTES + 2 * W_BYTES;  // 20480
constexpr int STAGES = 2;
constexpr int SMEM_BYTES = STAGES * STAGE_BYTES;    // 40960
static_assert(THREADS == 256 && SMEM_BYTES == 40960, "launch contract stated above");
static_assert(SMEM_BYTES <= 48 * 1024, "static shared memory limit");
static_assert((BM * CPR) % THREADS == 0 && (BN * CPR) % THREADS == 0, "whole copy rounds");
static_assert(WN % 16 == 0 && BK % 16 == 0, "ldmatrix.x4 B loads cover two n8 tiles, mma k = 16");

}  // namespace gg

template <typename T>
__device__ __forceinline__ void gemm_geglu(const T* __restrict__ x, const T* __restrict__ w,
                                           const T* __restrict__ bias, T* __restrict__ out, int m, int n, int k) {
    using namespace gg;
    using namespace tc;
    // Raw bytes (T may not be trivially constructible in __shared__); addressed as shared-window uint32_t.
    __shared__ __align__(16) unsigned char gg_smem[SMEM_BYTES];
    const uint32_t sbase = smem_addr(gg_smem);

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;                 // mma fragment row group / thread-in-group
    const int wm = warp % WARPS_M, wn = warp / WARPS_M;    // warp's tile: rows wm*32.., columns wn*32..
    const int m0 = blockIdx.y * BM, j0 = blockIdx.x * BN;  // block's first row of out / first column of out

    // Stage k-slice `kt` into buffer `stage`. Thread tid copies the 16-byte chunk at k columns kcol..kcol+7
    // (kcol = (tid % 4) * 8) of smem row crow = tid / 4 of every tile: x rows crow and crow + 64, value row
    // crow, gate row crow. Out-of-range rows (m / n tails) and k chunks (k tail; k % 8 == 0 so chunks are
    // all-in or all-out) are zero-filled; their source address is clamped to the base pointer and not read.
    static_assert(THREADS == BN * CPR && BM == 2 * BN, "one W chunk and two x chunks per thread and tile");
    const int crow = tid / CPR, kcol = (tid % CPR) * 8;
    const bool x0_ok = m0 + crow < m, x1_ok = m0 + crow + BM / 2 < m, w_ok = j0 + crow < n;
    const T* xsrc0 = x + (x0_ok ? (long)(m0 + crow) * k + kcol : 0L);
    const T* xsrc1 = x + (x1_ok ? (long)(m0 + crow + BM / 2) * k + kcol : 0L);
    const T* vsrc = w + (w_ok ? (long)(j0 + crow) * k + kcol : 0L);
    const T* gsrc = w + (w_ok ? (long)(n + j0 + crow) * k + kcol : 0L);
    const uint32_t cdst = sbase + (crow * PITCH + kcol) * 2;
    auto load_slice = [&](int stage, int kt) {
        const int k0 = kt * BK;
        const bool k_ok = k0 + kcol < k;
        const uint32_t d = cdst + stage * STAGE_BYTES;
        cp_async16(d, k_ok ? xsrc0 + k0 : x, x0_ok && k_ok);
        cp_async16(d + BM / 2 * PITCH * 2, k_ok ? xsrc1 + k0 : x, x1_ok && k_ok);
        cp_async16(d + X_BYTES, k_ok ? vsrc + k0 : w, w_ok && k_ok);
        cp_async16(d + X_BYTES + W_BYTES, k_ok ? gsrc + k0 : w, w_ok && k_ok);
    };

    // Per-lane ldmatrix row addresses (byte offsets within a stage, k-step 0).
    // A (x, 16×16 per m tile): matrices (rows 0-7 | 8-15) × (k 0-7 | 8-15) in the order a0, a1, a2, a3,
    //   so lane l addresses row l%16, k half l/16.
    // B (w, per pair of n8 tiles): matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
    //   = b0, b1 of n tile 2p and b0, b1 of n tile 2p+1.
    const uint32_t a_off = ((wm * WM + (lane & 15)) * PITCH + (lane >> 4) * 8) * 2;
    const uint32_t b_off =
        X_BYTES + ((wn * WN + (lane & 7) + ((lane >> 4) << 3)) * PITCH + ((lane >> 3) & 1) * 8) * 2;

    float acc[2][MT][NT][4];  // [value | gate][m tile][n tile][mma accumulator]
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int mi = 0; mi < MT; ++mi)
#pragma unroll
            for (int ni = 0; ni < NT; ++ni)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[h][mi][ni][e] = 0.0f;

    const int ktiles = (k + BK - 1) / BK;
    load_slice(0, 0);
    cp_async_commit();
    for (int kt = 0; kt < ktiles; ++kt) {
        // One barrier per slice: after it, slice kt is visible to all threads AND every warp has finished
        // reading slice kt-1, whose buffer ((kt+1) & 1) is then refilled with slice kt+1 while kt is computed.
        cp_async_wait<0>();
        __syncthreads();
        if (kt + 1 < ktiles) {
            load_slice((kt + 1) & 1, kt + 1);
            cp_async_commit();
        }
        const uint32_t st = sbase + (kt & 1) * STAGE_BYTES;
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
            uint32_t af[MT][4];
#pragma unroll
            for (int mi = 0; mi < MT; ++mi) ldsm_x4(af[mi], st + a_off + mi * 16 * PITCH * 2 + kk * 32);
#pragma unroll
            for (int h = 0; h < 2; ++h) {  // value tile, then gate tile (W_BYTES further)
#pragma unroll
                for (int p = 0; p < NT / 2; ++p) {
                    uint32_t bf[4];
                    ldsm_x4(bf, st + b_off + h * W_BYTES + p * 16 * PITCH * 2 + kk * 32);
#pragma unroll
                    for (int mi = 0; mi < MT; ++mi) {
                        Mma<T>::run(acc[h][mi][2 * p], af[mi], bf[0], bf[1]);
                        Mma<T>::run(acc[h][mi][2 * p + 1], af[mi], bf[2], bf[3]);
                    }
                }
            }
        }
    }

    // Epilogue: acc[h][mi][ni][e] is row wm*32 + mi*16 + g + 8(e/2), column wn*32 + ni*8 + 2t + e%2 of the
    // block tile. Each thread writes 2 adjacent columns (32 bits) per row; n % 8 == 0 makes an n tile all-in
    // or all-out, and n even keeps the stores 4-byte aligned.
#pragma unroll
    for (int ni = 0; ni < NT; ++ni) {
        const int col = j0 + wn * WN + ni * 8 + 2 * t;
        if (col >= n) continue;
        const float bv0 = to_f(bias[col]), bv1 = to_f(bias[col + 1]);
        const float bg0 = to_f(bias[n + col]), bg1 = to_f(bias[n + col + 1]);
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) {
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const int row = m0 + wm * WM + mi * 16 + g + 8 * i;
                if (row >= m) continue;
                const float* v = acc[0][mi][ni];
                const float* gt = acc[1][mi][ni];
                const float o0 = (v[2 * i] + bv0) * gelu_f(gt[2 * i] + bg0);
                const float o1 = (v[2 * i + 1] + bv1) * gelu_f(gt[2 * i + 1] + bg1);
                *reinterpret_cast<uint32_t*>(out + (long)row * n + col) = Mma<T>::pack2(o0, o1);
            }
        }
    }
}

#define GEMM_GEGLU(S, T)                                                                                      \
    extern "C" __global__ void __launch_bounds__(gg::THREADS, 2)                                              \
        gemm_geglu_##S(const T* x, const T* w, const T* bias, T* out, int m, int n, int k) {                  \
        gemm_geglu<T>(x, w, bias, out, m, n, k);                                                              \
    }
TOFFEE_INSTANTIATE(GEMM_GEGLU)
