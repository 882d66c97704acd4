// Fast GroupNorm (+ SiLU) over NHWC and LayerNorm over the last dimension; same maths as norm.cu (the
// reference path): biased variance, y = (x - mean) * rsqrt(var + eps) * gamma + beta, fp32 statistics.
// GroupNorm is two launches so that the statistics pass fills the GPU even when N*groups is small:
//   group_norm_stats_{S}  grid (splits, N), block 256. Block (s, n) reduces pixels
//     [s*ceil(hw/splits), min(hw, (s+1)*ceil(hw/splits))) of sample n, every group g, into
//     partial[((n*groups+g)*splits+s)*3 + {0,1,2}] = {count, mean, M2}; empty splits write {0,0,0}.
//     Scratch: N*groups*splits*3 floats. Preconditions: c % 8 == 0, c <= 2048 (one vector column per
//     thread), groups | c with c / groups >= 4, x 16-byte aligned; every load is a whole 16-byte vector.
//   group_norm_apply_{S}  grid (ceil(hw/GN_PIX_PER_BLOCK), N), block 256, GN_PIX_PER_BLOCK = 32.
//     Preconditions: c % 8 == 0, groups <= 128, x/y/gamma/beta 16-byte aligned.
// Host choice of splits (H200, 132 SMs): all stats blocks resident in one wave (no tail) and >= 4096
// elements per block so fixed costs stay small:
//   splits = clamp(floor(528 / N), 1, min(32, max(1, hw*c / 4096)))
// 528 = 4 blocks/SM x 132. The cap of 32 keeps the apply preamble at one partial per lane per group; any
// splits >= 1 is correct.
//   layer_norm_warp_{S}  grid ceil(rows/8), block 256, one warp per row. Preconditions: c % 8 == 0,
//     x/y/gamma/beta 16-byte aligned. Rows of c <= 1024 live in registers; longer rows are re-read.
#include "common.cuh"
#define GN_PIX_PER_BLOCK 32
#define GN_MAX_GROUPS 128

// Loads of W consecutive storage elements as one W*2-byte transaction (every load here is W = 8).
template <int W> struct VecBits;
template <> struct VecBits<8> { typedef uint4 type; };

template <typename T, int W> __device__ __forceinline__ void load_vec(const T* p, float (&f)[W]) {
    typedef typename VecBits<W>::type V;
    V u = __ldg(reinterpret_cast<const V*>(p));
    const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int j = 0; j < W; j++) f[j] = to_f(h[j]);
}
template <typename T> __device__ __forceinline__ void store_vec8(T* p, const float (&f)[8]) {
    uint4 u;
    T* h = reinterpret_cast<T*>(&u);
#pragma unroll
    for (int j = 0; j < 8; j++) h[j] = from_f<T>(f[j]);
    *reinterpret_cast<uint4*>(p) = u;
}

// Running (count, mean, M2). Chan et al.'s pairwise merge; count 0 on either side is a no-op.
struct Stat { float n, mean, m2; };
__device__ __forceinline__ Stat chan(Stat a, Stat b) {
    float n = a.n + b.n;
    float wb = n > 0.0f ? b.n / n : 0.0f;
    float d = b.mean - a.mean;
    a.m2 += b.m2 + d * d * a.n * wb;  // before a.n is updated
    a.mean += d * wb, a.n = n;
    return a;
}
// Tree merge down to lane 0 (other lanes hold partial results).
__device__ __forceinline__ Stat warp_merge(Stat a) {
    for (int o = 16; o > 0; o >>= 1) {
        Stat b = {__shfl_down_sync(0xffffffffu, a.n, o), __shfl_down_sync(0xffffffffu, a.mean, o),
                  __shfl_down_sync(0xffffffffu, a.m2, o)};
        a = chan(a, b);
    }
    return a;
}

// Statistics pass. Block (s, n) reduces pixels [s*chunk, min(hw, (s+1)*chunk)) of sample n for EVERY group,
// reading whole pixel rows as 16-byte vectors (consecutive threads, consecutive vectors), so every memory
// sector is used in full whatever the group width (one block per group read cg channels at a pixel stride:
// 4-20 bytes of each 32-byte sector at 128/320/640 channels). Each thread keeps one vector column v, so its
// 8 channels touch the same GN_SLOTS = 3 groups (or fewer) on every row, since groups have 4 or more channels (the
// host's precondition; SD's 128/320/640 channels in 32 groups have 4/10/20); the columns' partial stats then
// meet in shared memory, one warp per group.
constexpr int GN_SLOTS = 3;
template <typename T>
__device__ void group_norm_stats(const T* __restrict__ x, float* __restrict__ partial, int hw, int c, int groups,
                                 int splits) {
    __shared__ Stat col_stats[256 * GN_SLOTS];  // [thread][slot]
    const int n = blockIdx.y, cg = c / groups, vpr = c >> 3;
    const int rows_par = blockDim.x / vpr;  // pixel rows read side by side (host: vpr <= blockDim)
    const int tid = threadIdx.x, v = tid % vpr, r0 = tid / vpr;
    const int chunk = (hw + splits - 1) / splits;
    const int p0 = min(hw, (int)blockIdx.x * chunk), p1 = min(hw, p0 + chunk);
    // The groups of this thread's channels [8v, 8v + 8): slot k is group g0 + k, channels [lo[k], hi[k]).
    const int c0 = v * 8, g0 = c0 / cg;
    int lo[GN_SLOTS], hi[GN_SLOTS];
#pragma unroll
    for (int k = 0; k < GN_SLOTS; k++) {
        lo[k] = min(8, max(0, (g0 + k) * cg - c0));
        hi[k] = min(8, max(0, (g0 + k + 1) * cg - c0));
    }
    Stat st[GN_SLOTS];
#pragma unroll
    for (int k = 0; k < GN_SLOTS; k++) st[k] = Stat{0.0f, 0.0f, 0.0f};
    if (r0 < rows_par) {
        const T* base = x + (size_t)n * hw * c + c0;
        for (int p = p0 + r0; p < p1; p += rows_par) {
            float f[8];
            load_vec<T, 8>(base + (size_t)p * c, f);
#pragma unroll
            for (int k = 0; k < GN_SLOTS; k++) {
                if (lo[k] >= hi[k]) continue;
                // Exact two-pass stats of this group's channels of the vector, then one Chan merge.
                float sum = 0.0f;
                for (int j = lo[k]; j < hi[k]; j++) sum += f[j];
                Stat b = {(float)(hi[k] - lo[k]), sum / (float)(hi[k] - lo[k]), 0.0f};
                for (int j = lo[k]; j < hi[k]; j++) b.m2 += (f[j] - b.mean) * (f[j] - b.mean);
                st[k] = chan(st[k], b);
            }
        }
    }
#pragma unroll
    for (int k = 0; k < GN_SLOTS; k++) col_stats[tid * GN_SLOTS + k] = st[k];
    __syncthreads();
    // Group g's contributions: columns v in [g*cg/8, ((g+1)*cg - 1)/8], every row offset; slot g - v*8/cg.
    const int lane = tid & 31, warp = tid >> 5, nw = blockDim.x >> 5;
    for (int g = warp; g < groups; g += nw) {
        const int vlo = g * cg / 8, vhi = ((g + 1) * cg - 1) / 8, ncol = vhi - vlo + 1;
        Stat acc = {0.0f, 0.0f, 0.0f};
        for (int j = lane; j < ncol * rows_par; j += 32) {
            const int cv = vlo + j % ncol, r = j / ncol;
            acc = chan(acc, col_stats[(r * vpr + cv) * GN_SLOTS + (g - cv * 8 / cg)]);
        }
        acc = warp_merge(acc);
        float* out = partial + (((size_t)n * groups + g) * splits + blockIdx.x) * 3;
        if (lane == 0) out[0] = acc.n, out[1] = acc.mean, out[2] = acc.m2;
    }
}

template <typename T>
__device__ void group_norm_apply(const T* __restrict__ x, const float* __restrict__ partial,
                                 const T* __restrict__ gamma, const T* __restrict__ beta, T* __restrict__ y, int hw,
                                 int c, int groups, int splits, float eps, int silu) {
    __shared__ float s_mean[GN_MAX_GROUPS], s_inv[GN_MAX_GROUPS];
    int n = blockIdx.y, cg = c / groups;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    // Every block re-merges its sample's partials (tiny, L1/L2-resident): one warp per group, lanes over splits.
    for (int g = warp; g < groups; g += nw) {
        const float* pp = partial + ((size_t)n * groups + g) * splits * 3;
        Stat st = {0.0f, 0.0f, 0.0f};
        for (int s = lane; s < splits; s += 32)
            st = chan(st, Stat{__ldg(pp + 3 * s), __ldg(pp + 3 * s + 1), __ldg(pp + 3 * s + 2)});
        st = warp_merge(st);
        if (lane == 0) s_mean[g] = st.mean, s_inv[g] = rsqrtf(st.m2 / st.n + eps);
    }
    __syncthreads();

    int p0 = blockIdx.x * GN_PIX_PER_BLOCK, npix = min(GN_PIX_PER_BLOCK, hw - p0);
    int cv = c >> 3, total = npix * cv;
    size_t off0 = ((size_t)n * hw + p0) * c;
    for (int i = threadIdx.x; i < total; i += blockDim.x) {
        int p = i / cv, c0 = (i - p * cv) * 8;
        size_t off = off0 + (size_t)p * c + c0;
        float f[8], gm[8], bt[8];
        load_vec<T, 8>(x + off, f);
        load_vec<T, 8>(gamma + c0, gm);
        load_vec<T, 8>(beta + c0, bt);
        // A vector may straddle groups (cg < 8 or cg % 8 != 0): walk the group index without dividing per channel.
        int g = c0 / cg, r = c0 - g * cg;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            float o = (f[j] - s_mean[g]) * s_inv[g] * gm[j] + bt[j];  // same order as norm.cu
            f[j] = silu ? silu_f(o) : o;
            if (++r == cg) { r = 0; ++g; }
        }
        store_vec8<T>(y + off, f);
    }
}

// LayerNorm: normalise and store the row's 8-vector vi.
template <typename T>
__device__ __forceinline__ void ln_store8(float (&f)[8], const T* __restrict__ gamma, const T* __restrict__ beta,
                                          T* __restrict__ yr, int vi, float mean, float inv) {
    float gm[8], bt[8];
    load_vec<T, 8>(gamma + vi * 8, gm);
    load_vec<T, 8>(beta + vi * 8, bt);
    for (int j = 0; j < 8; j++) f[j] = (f[j] - mean) * inv * gm[j] + bt[j];
    store_vec8<T>(yr + vi * 8, f);
}

// One warp per row, row held in registers: the lane owns 8-vectors lane, lane+32, ... (VPL of them).
template <typename T, int VPL>
__device__ __forceinline__ void layer_norm_regs(const T* __restrict__ xr, const T* __restrict__ gamma,
                                                const T* __restrict__ beta, T* __restrict__ yr, int c, float eps,
                                                int lane) {
    int nv = c >> 3;
    float f[VPL][8], s = 0.0f, ss = 0.0f;
#pragma unroll
    for (int v = 0; v < VPL; v++)
        if (lane + v * 32 < nv) {
            load_vec<T, 8>(xr + (lane + v * 32) * 8, f[v]);
            for (int j = 0; j < 8; j++) s += f[v][j];
        }
    float mean = warp_sum(s) / (float)c;
#pragma unroll
    for (int v = 0; v < VPL; v++)
        if (lane + v * 32 < nv)
            for (int j = 0; j < 8; j++) ss += (f[v][j] - mean) * (f[v][j] - mean);
    float inv = rsqrtf(warp_sum(ss) / (float)c + eps);
#pragma unroll
    for (int v = 0; v < VPL; v++)
        if (lane + v * 32 < nv) ln_store8<T>(f[v], gamma, beta, yr, lane + v * 32, mean, inv);
}

// Long rows (c > 1024): three passes over global memory; the warp's row (<= 16 KB) stays L1/L2-resident.
template <typename T>
__device__ __forceinline__ void layer_norm_stream(const T* __restrict__ xr, const T* __restrict__ gamma,
                                                  const T* __restrict__ beta, T* __restrict__ yr, int c, float eps,
                                                  int lane) {
    int nv = c >> 3;
    float f[8], s = 0.0f, ss = 0.0f;
    for (int vi = lane; vi < nv; vi += 32) {
        load_vec<T, 8>(xr + vi * 8, f);
        for (int j = 0; j < 8; j++) s += f[j];
    }
    float mean = warp_sum(s) / (float)c;
    for (int vi = lane; vi < nv; vi += 32) {
        load_vec<T, 8>(xr + vi * 8, f);
        for (int j = 0; j < 8; j++) ss += (f[j] - mean) * (f[j] - mean);
    }
    float inv = rsqrtf(warp_sum(ss) / (float)c + eps);
    for (int vi = lane; vi < nv; vi += 32) {
        load_vec<T, 8>(xr + vi * 8, f);
        ln_store8<T>(f, gamma, beta, yr, vi, mean, inv);
    }
}

template <typename T>
__device__ void layer_norm_warp(const T* __restrict__ x, const T* __restrict__ gamma, const T* __restrict__ beta,
                                T* __restrict__ y, int rows, int c, float eps) {
    int lane = threadIdx.x & 31;
    long row = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;  // whole warp exits together; no block-level sync below
    const T* xr = x + row * c;
    T* yr = y + row * c;
    if (c <= 256) layer_norm_regs<T, 1>(xr, gamma, beta, yr, c, eps, lane);
    else if (c <= 512) layer_norm_regs<T, 2>(xr, gamma, beta, yr, c, eps, lane);
    else if (c <= 1024) layer_norm_regs<T, 4>(xr, gamma, beta, yr, c, eps, lane);
    else layer_norm_stream<T>(xr, gamma, beta, yr, c, eps, lane);
}

#define NORM_FAST(S, T)                                                                                      \
    extern "C" __global__ void __launch_bounds__(256)                                                        \
        group_norm_stats_##S(const T* x, float* partial, int hw, int c, int groups, int splits) {            \
        group_norm_stats<T>(x, partial, hw, c, groups, splits);                                              \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(256)                                                        \
        group_norm_apply_##S(const T* x, const float* partial, const T* gamma, const T* beta, T* y, int hw,  \
                             int c, int groups, int splits, float eps, int silu) {                           \
        group_norm_apply<T>(x, partial, gamma, beta, y, hw, c, groups, splits, eps, silu);                   \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(256)                                                        \
        layer_norm_warp_##S(const T* x, const T* gamma, const T* beta, T* y, int rows, int c, float eps) {   \
        layer_norm_warp<T>(x, gamma, beta, y, rows, c, eps);                                                 \
    }
TOFFEE_INSTANTIATE(NORM_FAST)
