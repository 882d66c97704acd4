// SAM (segment anything) vision attention: the decomposed relative-position terms added to the f32
// score rows that attention.cu's `attn_scores` wrote (UNTESTED ON A GPU). One thread per score:
// s[bh, i, j] += q_i · rel_h[qy − ky + gh − 1] + q_i · rel_w[qx − kx + gw − 1], q unscaled, fp32
// arithmetic, any storage type. Simple first: each thread redoes its two D-long dot products.
#include "common.cuh"

template <typename T>
__device__ void rel_pos_bias(const T* q, const T* rh, const T* rw, float* s, int heads, int gh, int gw, int d) {
    int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    long l = (long)gh * gw;
    long hd = (long)heads * d;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < l * l; i += (long)gridDim.x * blockDim.x) {
        int r = (int)(i / l), c = (int)(i % l);
        int qy = r / gw, qx = r % gw, ky = c / gw, kx = c % gw;
        const T* qr = q + ((long)b * l + r) * hd + (long)h * d;
        const T* th = rh + (long)(qy - ky + gh - 1) * d;
        const T* tw = rw + (long)(qx - kx + gw - 1) * d;
        float acc = 0.0f;
        for (int j = 0; j < d; ++j) acc += to_f(qr[j]) * (to_f(th[j]) + to_f(tw[j]));
        s[(long)bh * l * l + i] += acc;
    }
}

#define SAM_KERNELS(S, T)                                                                                   \
    extern "C" __global__ void rel_pos_bias_##S(const T* q, const T* rh, const T* rw, float* s, int heads, \
                                                int gh, int gw, int d) {                                   \
        rel_pos_bias<T>(q, rh, rw, s, heads, gh, gw, d);                                                   \
    }
TOFFEE_INSTANTIATE(SAM_KERNELS)
