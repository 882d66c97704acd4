// Memory-bound glue: activations, GEGLU, residual adds, broadcasts, channel concat/slice, nearest
// upsampling, im2col, embeddings, casts, and the scheduler's linear combinations. One thread per
// output element (grid-stride), fp32 arithmetic, any storage type (fp16, bf16, fp32).
#include "common.cuh"

#define GRID_STRIDE(i, n) for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (long)gridDim.x * blockDim.x)

// kind: 0 silu, 1 gelu (erf), 2 quick_gelu, 3 identity, 4 tanh, 5 relu, 6 sigmoid.
__device__ __forceinline__ float act_f(float v, int kind) {
    return kind == 0 ? silu_f(v) : kind == 1 ? gelu_f(v) : kind == 2 ? quick_gelu_f(v) : kind == 4 ? tanhf(v)
         : kind == 5 ? fmaxf(v, 0.0f) : kind == 6 ? 1.0f / (1.0f + expf(-v)) : v;
}

// y = act(a·x + b).
template <typename T> __device__ void act(const T* x, T* y, long n, int kind, float a, float b) {
    GRID_STRIDE(i, n) {
        float v = a * to_f(x[i]) + b;
        y[i] = from_f<T>(act_f(v, kind));
    }
}

// Gated unit: y[r, j] = x[r, j] · act(x[r, c + j]) for x of width 2c (GEGLU, SwiGLU).
template <typename T> __device__ void glu(const T* x, T* y, long rows, int c, int kind) {
    GRID_STRIDE(i, rows * c) {
        long r = i / c;
        int j = (int)(i % c);
        y[i] = from_f<T>(to_f(x[r * 2 * c + j]) * act_f(to_f(x[r * 2 * c + c + j]), kind));
    }
}

// y = a + s·b (y may alias a).
template <typename T> __device__ void add_scaled(const T* a, const T* b, T* y, long n, float s) {
    GRID_STRIDE(i, n) y[i] = from_f<T>(to_f(a[i]) + s * to_f(b[i]));
}

// y[n, p, c] = x[n, p, c] + v[n, c] (time embedding into a resnet; bias when per = rows, v has one row).
template <typename T> __device__ void add_broadcast(const T* x, const T* v, T* y, long total, long per, int c, int v_rows) {
    GRID_STRIDE(i, total) {
        long sample = (i / per) % v_rows;
        y[i] = from_f<T>(to_f(x[i]) + to_f(v[sample * c + i % c]));
    }
}

// y += bias[c] + ps[n, c] + r, each term optional (null): a convolution's bias, time embedding and
// residual in one pass over its output, where cuDNN's convolution writes only the product.
template <typename T> __device__ void conv_epilogue(T* y, const T* bias, const T* ps, const T* r, long total, long per, int c) {
    GRID_STRIDE(i, total) {
        int ch = (int)(i % c);
        float v = to_f(y[i]);
        if (bias) v += to_f(bias[ch]);
        if (ps) v += to_f(ps[(i / per) * c + ch]);
        if (r) v += to_f(r[i]);
        y[i] = from_f<T>(v);
    }
}

// dst[r, off + j] = src[r, j]: one part of a channel concatenation.
template <typename T> __device__ void place_channels(const T* src, int cs, T* dst, int cd, int off, long rows) {
    GRID_STRIDE(i, rows * cs) dst[(i / cs) * cd + off + i % cs] = src[i];
}

// dst[r, j] = src[r, off + j]: a channel slice.
template <typename T> __device__ void slice_channels(const T* src, int cs, T* dst, int cd, int off, long rows) {
    GRID_STRIDE(i, rows * cd) dst[i] = src[(i / cd) * cs + off + i % cd];
}

// Nearest resize of NHWC with PyTorch's index rule: src = floor(dst · in / out).
template <typename T> __device__ void upsample_nearest(const T* x, T* y, int n, int h, int w, int c, int oh, int ow) {
    float sy = (float)h / oh, sx = (float)w / ow;
    GRID_STRIDE(i, (long)n * oh * ow * c) {
        int ch = (int)(i % c);
        long p = i / c;
        int ox = (int)(p % ow), oy = (int)((p / ow) % oh), b = (int)(p / ((long)ow * oh));
        int iy = min((int)(oy * sy), h - 1), ix = min((int)(ox * sx), w - 1);
        y[i] = x[(((long)b * h + iy) * w + ix) * c + ch];
    }
}

// im2col for NHWC: cols[(b·ho + oy)·wo + ox, (ky·k + kx)·c + ch], zero outside the padded image.
template <typename T> __device__ void im2col(const T* x, T* cols, int n, int h, int w, int c, int k, int stride,
                                             int pad_t, int pad_l, int ho, int wo) {
    long kk = (long)k * k * c;
    GRID_STRIDE(i, (long)n * ho * wo * kk) {
        long row = i / kk;
        int col = (int)(i % kk);
        int ch = col % c, kx = (col / c) % k, ky = col / (c * k);
        int ox = (int)(row % wo), oy = (int)((row / wo) % ho), b = (int)(row / ((long)wo * ho));
        int iy = oy * stride + ky - pad_t, ix = ox * stride + kx - pad_l;
        cols[i] = (iy >= 0 && iy < h && ix >= 0 && ix < w) ? x[(((long)b * h + iy) * w + ix) * c + ch] : from_f<T>(0.0f);
    }
}

// diffusers' get_timestep_embedding (scale 1, max period 10000) for t[b] (fp32).
template <typename T> __device__ void timestep_embedding(const float* t, T* y, int b, int dim, int flip, float shift) {
    int half = dim / 2;
    GRID_STRIDE(i, (long)b * dim) {
        int row = (int)(i / dim), j = (int)(i % dim);
        int f = j < half ? j : j - half;
        bool first = j < half;
        if (f >= half) { y[i] = from_f<T>(0.0f); continue; }
        float freq = expf(-9.210340371976184f * f / (half - shift));
        float a = t[row] * freq;
        bool use_cos = flip ? first : !first;
        y[i] = from_f<T>(use_cos ? cosf(a) : sinf(a));
    }
}

// y[r] = table[ids[r]] (token embeddings) or x[idx[r]] (pooling): row gather.
template <typename T> __device__ void gather_rows(const T* table, const int* ids, T* y, long rows, int d) {
    GRID_STRIDE(i, rows * d) y[i] = table[(long)ids[i / d] * d + i % d];
}

// out = c0·t0 + c1·t1 + c2·t2 + c3·t3 (null terms skipped): every scheduler update is one of these.
template <typename T> __device__ void lincomb(const T* t0, float c0, const T* t1, float c1, const T* t2, float c2,
                                              const T* t3, float c3, T* out, long n) {
    GRID_STRIDE(i, n) {
        float v = c0 * to_f(t0[i]);
        if (t1) v += c1 * to_f(t1[i]);
        if (t2) v += c2 * to_f(t2[i]);
        if (t3) v += c3 * to_f(t3[i]);
        out[i] = from_f<T>(v);
    }
}

// Classifier-free guidance: pred = [uncond; cond] (half = n per part) -> u + g·(c - u).
template <typename T> __device__ void cfg_combine(const T* pred, T* out, long half, float g) {
    GRID_STRIDE(i, half) {
        float u = to_f(pred[i]), c = to_f(pred[half + i]);
        out[i] = from_f<T>(u + g * (c - u));
    }
}

// out = (1 - m)·a + m·b with a one-channel mask per pixel (inpainting blend).
template <typename T> __device__ void mask_mix(const T* a, const T* b, const T* mask, T* out, long pixels, int c) {
    GRID_STRIDE(i, pixels * c) {
        float m = to_f(mask[i / c]);
        out[i] = from_f<T>((1.0f - m) * to_f(a[i]) + m * to_f(b[i]));
    }
}

// VAE posterior sample: out = scale·(mean + exp(½·clamp(logvar, -30, 20))·noise).
template <typename T> __device__ void gauss_sample(const T* mean, const T* logvar, const T* noise, T* out, long n, float scale) {
    GRID_STRIDE(i, n) {
        float lv = fminf(fmaxf(to_f(logvar[i]), -30.0f), 20.0f);
        out[i] = from_f<T>(scale * (to_f(mean[i]) + expf(0.5f * lv) * to_f(noise[i])));
    }
}

// y = clamp(a·x + b, lo, hi) (image post-processing, mask binarisation with lo = hi threshold trick is not used).
template <typename T> __device__ void affine_clamp(const T* x, T* y, long n, float a, float b, float lo, float hi) {
    GRID_STRIDE(i, n) y[i] = from_f<T>(fminf(fmaxf(a * to_f(x[i]) + b, lo), hi));
}

// Pixel shuffle of a stride-k transposed convolution's GEMM output: x [n, h, w, k·k·c] with channel
// (ky·k + kx)·c + ch → y [n, h·k, w·k, c].
template <typename T> __device__ void depth_to_space(const T* x, T* y, int n, int h, int w, int c, int k) {
    int ow = w * k, oh = h * k;
    GRID_STRIDE(i, (long)n * oh * ow * c) {
        int ch = (int)(i % c);
        long p = i / c;
        int ox = (int)(p % ow), oy = (int)((p / ow) % oh), b = (int)(p / ((long)ow * oh));
        int iy = oy / k, ix = ox / k, ky = oy % k, kx = ox % k;
        y[i] = x[(((long)b * h + iy) * w + ix) * ((long)k * k * c) + (ky * k + kx) * c + ch];
    }
}

// torch's source coordinate for bilinear interpolation (no antialias).
__device__ __forceinline__ float bilinear_src(int o, int in, int out, int align) {
    if (align) return out > 1 ? (float)o * (float)(in - 1) / (float)(out - 1) : 0.0f;
    float s = ((float)o + 0.5f) * (float)in / (float)out - 0.5f;
    return s < 0.0f ? 0.0f : s;
}

// Bilinear resize of NHWC with F.interpolate(mode="bilinear", align_corners=align) index rules.
template <typename T> __device__ void resize_bilinear(const T* x, T* y, int n, int h, int w, int c, int oh, int ow, int align) {
    GRID_STRIDE(i, (long)n * oh * ow * c) {
        int ch = (int)(i % c);
        long p = i / c;
        int ox = (int)(p % ow), oy = (int)((p / ow) % oh), b = (int)(p / ((long)ow * oh));
        float sy = bilinear_src(oy, h, oh, align), sx = bilinear_src(ox, w, ow, align);
        int y0 = min((int)sy, h - 1), x0 = min((int)sx, w - 1);
        int y1 = min(y0 + 1, h - 1), x1 = min(x0 + 1, w - 1);
        float ly = sy - y0, lx = sx - x0;
        const T* base = x + (long)b * h * w * c + ch;
        float v00 = to_f(base[((long)y0 * w + x0) * c]), v01 = to_f(base[((long)y0 * w + x1) * c]);
        float v10 = to_f(base[((long)y1 * w + x0) * c]), v11 = to_f(base[((long)y1 * w + x1) * c]);
        y[i] = from_f<T>((1.0f - ly) * ((1.0f - lx) * v00 + lx * v01) + ly * ((1.0f - lx) * v10 + lx * v11));
    }
}

// FiLM: y[n, p, c] = mul[n, c]·x[n, p, c] + add[n, c].
template <typename T> __device__ void film(const T* x, const T* mul, const T* add, T* y, long total, long per, int c) {
    GRID_STRIDE(i, total) {
        long v = (i / per) * c + i % c;
        y[i] = from_f<T>(to_f(mul[v]) * to_f(x[i]) + to_f(add[v]));
    }
}

#define ELEMENTWISE(S, T)                                                                                            \
    extern "C" __global__ void act_##S(const T* x, T* y, long n, int kind, float a, float b) { act<T>(x, y, n, kind, a, b); } \
    extern "C" __global__ void glu_##S(const T* x, T* y, long rows, int c, int kind) { glu<T>(x, y, rows, c, kind); } \
    extern "C" __global__ void add_scaled_##S(const T* a, const T* b, T* y, long n, float s) { add_scaled<T>(a, b, y, n, s); } \
    extern "C" __global__ void add_broadcast_##S(const T* x, const T* v, T* y, long total, long per, int c, int v_rows) { \
        add_broadcast<T>(x, v, y, total, per, c, v_rows);                                                            \
    }                                                                                                                \
    extern "C" __global__ void conv_epilogue_##S(T* y, const T* bias, const T* ps, const T* r, long total, long per, int c) { \
        conv_epilogue<T>(y, bias, ps, r, total, per, c);                                                              \
    }                                                                                                                \
    extern "C" __global__ void place_channels_##S(const T* s, int cs, T* d, int cd, int off, long rows) {           \
        place_channels<T>(s, cs, d, cd, off, rows);                                                                  \
    }                                                                                                                \
    extern "C" __global__ void slice_channels_##S(const T* s, int cs, T* d, int cd, int off, long rows) {           \
        slice_channels<T>(s, cs, d, cd, off, rows);                                                                  \
    }                                                                                                                \
    extern "C" __global__ void depth_to_space_##S(const T* x, T* y, int n, int h, int w, int c, int k) {          \
        depth_to_space<T>(x, y, n, h, w, c, k);                                                                      \
    }                                                                                                                \
    extern "C" __global__ void resize_bilinear_##S(const T* x, T* y, int n, int h, int w, int c, int oh, int ow,     \
                                                   int align) {                                                      \
        resize_bilinear<T>(x, y, n, h, w, c, oh, ow, align);                                                         \
    }                                                                                                                \
    extern "C" __global__ void film_##S(const T* x, const T* m, const T* a, T* y, long total, long per, int c) {    \
        film<T>(x, m, a, y, total, per, c);                                                                          \
    }                                                                                                                \
    extern "C" __global__ void upsample_nearest_##S(const T* x, T* y, int n, int h, int w, int c, int oh, int ow) {  \
        upsample_nearest<T>(x, y, n, h, w, c, oh, ow);                                                               \
    }                                                                                                                \
    extern "C" __global__ void im2col_##S(const T* x, T* cols, int n, int h, int w, int c, int k, int stride, int pt, \
                                          int pl, int ho, int wo) {                                                  \
        im2col<T>(x, cols, n, h, w, c, k, stride, pt, pl, ho, wo);                                                   \
    }                                                                                                                \
    extern "C" __global__ void timestep_embedding_##S(const float* t, T* y, int b, int dim, int flip, float shift) {  \
        timestep_embedding<T>(t, y, b, dim, flip, shift);                                                            \
    }                                                                                                                \
    extern "C" __global__ void gather_rows_##S(const T* table, const int* ids, T* y, long rows, int d) {             \
        gather_rows<T>(table, ids, y, rows, d);                                                                      \
    }                                                                                                                \
    extern "C" __global__ void lincomb_##S(const T* t0, float c0, const T* t1, float c1, const T* t2, float c2,      \
                                           const T* t3, float c3, T* out, long n) {                                  \
        lincomb<T>(t0, c0, t1, c1, t2, c2, t3, c3, out, n);                                                          \
    }                                                                                                                \
    extern "C" __global__ void cfg_combine_##S(const T* p, T* o, long half, float g) { cfg_combine<T>(p, o, half, g); } \
    extern "C" __global__ void mask_mix_##S(const T* a, const T* b, const T* m, T* o, long px, int c) {              \
        mask_mix<T>(a, b, m, o, px, c);                                                                              \
    }                                                                                                                \
    extern "C" __global__ void gauss_sample_##S(const T* m, const T* lv, const T* nz, T* o, long n, float s) {       \
        gauss_sample<T>(m, lv, nz, o, n, s);                                                                         \
    }                                                                                                                \
    extern "C" __global__ void affine_clamp_##S(const T* x, T* y, long n, float a, float b, float lo, float hi) {    \
        affine_clamp<T>(x, y, n, a, b, lo, hi);                                                                      \
    }

TOFFEE_INSTANTIATE(ELEMENTWISE)
ELEMENTWISE(f32, float)

// Storage conversions for uploads and downloads.
template <typename A, typename B> __device__ void cast(const A* x, B* y, long n) { GRID_STRIDE(i, n) y[i] = from_f<B>(to_f(x[i])); }
extern "C" __global__ void cast_f32_f16(const float* x, __half* y, long n) { cast(x, y, n); }
extern "C" __global__ void cast_f32_bf16(const float* x, __nv_bfloat16* y, long n) { cast(x, y, n); }
extern "C" __global__ void cast_f16_f32(const __half* x, float* y, long n) { cast(x, y, n); }
extern "C" __global__ void cast_bf16_f32(const __nv_bfloat16* x, float* y, long n) { cast(x, y, n); }
// Into and out of a bf16 model (a force_upcast VAE) inside an fp16 pipeline.
extern "C" __global__ void cast_f16_bf16(const __half* x, __nv_bfloat16* y, long n) { cast(x, y, n); }
extern "C" __global__ void cast_bf16_f16(const __nv_bfloat16* x, __half* y, long n) { cast(x, y, n); }
