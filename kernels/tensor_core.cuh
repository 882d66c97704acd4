// Tensor-core building blocks shared by flash_tc.cu and gemm_geglu.cu (sm_80+): cp.async copies,
// ldmatrix fragment loads and mma.sync m16n8k16 with fp32 accumulation, for fp16 and bf16 storage.
#pragma once
#include "common.cuh"
#include <string.h>

namespace tc {
__device__ __forceinline__ uint32_t smem_addr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

#ifdef TOFFEE_EMU
// CPU emulation (kernels/emu/emu.h): the same helpers on the emulated warp, with the PTX ISA semantics.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
    emu::cp_async16(dst, src, valid ? 16u : 0u);
}
__device__ __forceinline__ void cp_async_commit() { emu::cp_async_commit(); }
template <int N> __device__ __forceinline__ void cp_async_wait() { emu::cp_async_wait(N); }
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) { emu::ldsm_x4(r, addr, false); }
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], uint32_t addr) { emu::ldsm_x4(r, addr, true); }
template <typename T> struct Mma;
#define TC_MMA(T, BF16, CVT)                                                                                  \
    template <> struct Mma<T> {                                                                                \
        static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {                     \
            emu::mma16816<BF16>(c, a, b0, b1);                                                                 \
        }                                                                                                      \
        static uint32_t pack2(float x, float y) {                                                              \
            auto h = CVT(make_float2(x, y));                                                                   \
            uint32_t u;                                                                                        \
            memcpy(&u, &h, 4);                                                                                 \
            return u;                                                                                          \
        }                                                                                                      \
    };
TC_MMA(__half, false, __float22half2_rn)
TC_MMA(__nv_bfloat16, true, __float22bfloat162_rn)
#undef TC_MMA
#else
// 16-byte global -> shared copy, bypassing L1; src-size 0 fills the 16 bytes with zeros (rows past lq / lk).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8×8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, register i receives matrix i
// with lane l holding row l/4, elements 2(l%4), 2(l%4)+1 (.trans: of the transposed matrix).
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// D(16×8, f32) += A(16×16, row) · B(16×8, col), per storage type; pack2 rounds two floats into one b32.
template <typename T> struct Mma;
#define TC_MMA(T, TY, CVT)                                                                                    \
    template <> struct Mma<T> {                                                                                \
        static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,         \
                                                   uint32_t b1) {                                              \
            asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TY "." TY ".f32 "                           \
                         "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                             \
                         : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                      \
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));                      \
        }                                                                                                      \
        static __device__ __forceinline__ uint32_t pack2(float x, float y) {                                   \
            auto h = CVT(make_float2(x, y));                                                                   \
            uint32_t u;                                                                                        \
            memcpy(&u, &h, 4);                                                                                 \
            return u;                                                                                          \
        }                                                                                                      \
    };
TC_MMA(__half, "f16", __float22half2_rn)
TC_MMA(__nv_bfloat16, "bf16", __float22bfloat162_rn)
#undef TC_MMA
#endif
}  // namespace tc
