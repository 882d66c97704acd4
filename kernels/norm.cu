// GroupNorm (+ optional SiLU) over NHWC and LayerNorm over the last dimension. Statistics in fp32,
// two passes (mean, then centred variance) to match the f32/f64 CPU reference on large groups.
#include "common.cuh"

// One block per (sample, group). x, y: [N, HW, C]; gamma, beta: [C] in the storage type.
template <typename T>
__device__ void group_norm(const T* __restrict__ x, const T* __restrict__ gamma, const T* __restrict__ beta,
                           T* __restrict__ y, int hw, int c, int groups, float eps, int silu) {
    __shared__ float scratch[32];
    int n = blockIdx.x / groups, g = blockIdx.x % groups;
    int cg = c / groups;
    long count = (long)hw * cg;
    const T* xs = x + (long)n * hw * c + g * cg;
    T* ys = y + (long)n * hw * c + g * cg;
    float s = 0.0f;
    for (long i = threadIdx.x; i < count; i += blockDim.x) s += to_f(xs[(i / cg) * c + i % cg]);
    float mean = block_sum(s, scratch) / (float)count;
    float v = 0.0f;
    for (long i = threadIdx.x; i < count; i += blockDim.x) {
        float d = to_f(xs[(i / cg) * c + i % cg]) - mean;
        v += d * d;
    }
    float inv = rsqrtf(block_sum(v, scratch) / (float)count + eps);
    for (long i = threadIdx.x; i < count; i += blockDim.x) {
        long off = (i / cg) * c + i % cg;
        int ch = g * cg + (int)(i % cg);
        float o = (to_f(xs[off]) - mean) * inv * to_f(gamma[ch]) + to_f(beta[ch]);
        ys[off] = from_f<T>(silu ? silu_f(o) : o);
    }
}

// One block per row of length c.
template <typename T>
__device__ void layer_norm(const T* __restrict__ x, const T* __restrict__ gamma, const T* __restrict__ beta,
                           T* __restrict__ y, int c, float eps) {
    __shared__ float scratch[32];
    const T* xr = x + (long)blockIdx.x * c;
    T* yr = y + (long)blockIdx.x * c;
    float s = 0.0f;
    for (int i = threadIdx.x; i < c; i += blockDim.x) s += to_f(xr[i]);
    float mean = block_sum(s, scratch) / (float)c;
    float v = 0.0f;
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        float d = to_f(xr[i]) - mean;
        v += d * d;
    }
    float inv = rsqrtf(block_sum(v, scratch) / (float)c + eps);
    for (int i = threadIdx.x; i < c; i += blockDim.x)
        yr[i] = from_f<T>((to_f(xr[i]) - mean) * inv * to_f(gamma[i]) + to_f(beta[i]));
}

#define NORM(S, T)                                                                                          \
    extern "C" __global__ void group_norm_##S(const T* x, const T* gamma, const T* beta, T* y, int hw, int c, \
                                              int groups, float eps, int silu) {                            \
        group_norm<T>(x, gamma, beta, y, hw, c, groups, eps, silu);                                         \
    }                                                                                                       \
    extern "C" __global__ void layer_norm_##S(const T* x, const T* gamma, const T* beta, T* y, int c, float eps) { \
        layer_norm<T>(x, gamma, beta, y, c, eps);                                                           \
    }
TOFFEE_INSTANTIATE(NORM)
