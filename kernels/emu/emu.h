// CPU emulation of the CUDA subset used by kernels/*.cu (TOFFEE_EMU builds; original code).
//
// Each kernel file is compiled as host C++17 with this header force-included
//   g++ -std=c++17 -O2 -DTOFFEE_EMU -Ikernels/emu -Ikernels -include kernels/emu/emu.h -x c++ -c k.cu
// after the build script has rewritten its __shared__ declarations (see shared memory below), and ends with
//   TOFFEE_EMU_MODULE(name, TOFFEE_EMU_KERNEL(k1) TOFFEE_EMU_KERNEL(k2) ...)
// The launch ABI is in registry.h.
//
// Execution model: every CUDA thread of a block is a fiber on the calling OS thread (a hand-written context
// switch on x86-64 / aarch64 ELF, ucontext elsewhere); blocks run one after another. __syncthreads and the warp
// collectives are cooperative barriers; a pass of the scheduler in which no thread can run is a deadlock.
// Every error (deadlock, partial-warp collective, shared memory out of range or misaligned, limits, fiber
// stack overflow) ends the launch with a message naming the block and thread; nothing aborts or prints.
// Fibers of an abandoned launch are simply re-initialised by the next one (nothing on their stacks needs
// destruction).
#pragma once
#ifndef TOFFEE_EMU_H
#define TOFFEE_EMU_H

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <math.h>
#include <random>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>
#include <sys/mman.h>

#include "registry.h"

// `#pragma unroll` is a CUDA pragma; g++ would warn about it under -Wall.
#pragma GCC diagnostic ignored "-Wunknown-pragmas"

#if defined(__x86_64__) && defined(__ELF__) && !defined(TOFFEE_EMU_UCONTEXT)
#define TOFFEE_EMU_CTX_X86_64 1
#elif defined(__aarch64__) && defined(__ELF__) && defined(TOFFEE_EMU_AARCH64_ASM) && !defined(TOFFEE_EMU_UCONTEXT)
// Opt-in until it has run on an aarch64 machine (ucontext otherwise).
#define TOFFEE_EMU_CTX_AARCH64 1
#else
#include <ucontext.h>
#define TOFFEE_EMU_CTX_UCONTEXT 1
#endif

// ---------------------------------------------------------------------------------------------------------
// CUDA keywords and built-in types
// ---------------------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// __shared__ declarations are rewritten by the build script into ::emu::dyn_smem() / ::emu::shared_var<>();
// one it missed must not silently become an ordinary variable.
#define __shared__ __shared___declaration_not_rewritten_for_TOFFEE_EMU

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 { unsigned x, y, z; };
#define TOFFEE_EMU_VEC2(T, N, A) struct __attribute__((may_alias, aligned(A))) N { T x, y; }; \
    inline N make_##N(T x, T y) { return N{x, y}; }
#define TOFFEE_EMU_VEC4(T, N, A) struct __attribute__((may_alias, aligned(A))) N { T x, y, z, w; }; \
    inline N make_##N(T x, T y, T z, T w) { return N{x, y, z, w}; }
TOFFEE_EMU_VEC2(float, float2, 8)
TOFFEE_EMU_VEC4(float, float4, 16)
TOFFEE_EMU_VEC2(int, int2, 8)
TOFFEE_EMU_VEC4(int, int4, 16)
TOFFEE_EMU_VEC2(unsigned, uint2, 8)
TOFFEE_EMU_VEC4(unsigned, uint4, 16)
TOFFEE_EMU_VEC2(unsigned short, ushort2, 4)
TOFFEE_EMU_VEC4(unsigned short, ushort4, 8)
#undef TOFFEE_EMU_VEC2
#undef TOFFEE_EMU_VEC4
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return uint3{x, y, z}; }
constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------------------------
// fp16 / bf16 storage types, round-to-nearest-even conversions (may_alias: kernels reinterpret vectors)
// ---------------------------------------------------------------------------------------------------------
struct __attribute__((may_alias)) __half { uint16_t x; };
struct __attribute__((may_alias)) __nv_bfloat16 { uint16_t x; };
struct __attribute__((may_alias, aligned(4))) __half2 { __half x, y; };
struct __attribute__((may_alias, aligned(4))) __nv_bfloat162 { __nv_bfloat16 x, y; };
typedef __half half;
typedef __half2 half2;

namespace emu {
inline uint32_t fbits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
inline float bitsf(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
inline float h2f(uint16_t h) {
    uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e == 0) return bitsf(s | fbits(std::ldexp((float)m, -24)));
    if (e == 31) return bitsf(s | 0x7f800000u | (m << 13));
    return bitsf(s | ((e - 15 + 127) << 23) | (m << 13));
}
inline uint16_t f2h(float f) {
    uint32_t x = fbits(f), sign = (x >> 16) & 0x8000, ax = x & 0x7fffffff;
    if (ax >= 0x7f800000) return (uint16_t)(sign | (ax > 0x7f800000 ? 0x7e00 : 0x7c00));
    if (ax >= 0x477ff000) return (uint16_t)(sign | 0x7c00);  // rounds to infinity
    if (ax < 0x38800000) return (uint16_t)(sign | (uint16_t)std::nearbyint(bitsf(ax) * 16777216.0f));  // subnormal
    uint32_t mant = ax & 0x7fffff, h = (((ax >> 23) - 127 + 15) << 10) | (mant >> 13), rem = mant & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;
    return (uint16_t)(sign | h);
}
inline float b2f(uint16_t b) { return bitsf((uint32_t)b << 16); }
inline uint16_t f2b(float f) {
    uint32_t u = fbits(f);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40);  // quiet NaN, sign kept
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}
}  // namespace emu

inline float __half2float(__half h) { return emu::h2f(h.x); }
inline __half __float2half(float f) { return {emu::f2h(f)}; }
inline __half __float2half_rn(float f) { return {emu::f2h(f)}; }
inline float __bfloat162float(__nv_bfloat16 b) { return emu::b2f(b.x); }
inline __nv_bfloat16 __float2bfloat16(float f) { return {emu::f2b(f)}; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {emu::f2b(f)}; }
inline __half2 __float22half2_rn(float2 v) { return {__float2half_rn(v.x), __float2half_rn(v.y)}; }
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return {__float2bfloat16_rn(v.x), __float2bfloat16_rn(v.y)}; }
inline float2 __half22float2(__half2 v) { return {__half2float(v.x), __half2float(v.y)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return {__bfloat162float(v.x), __bfloat162float(v.y)}; }
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)}; }

// ---------------------------------------------------------------------------------------------------------
// Device math: the float functions of <math.h> (expf, exp2f, tanhf, erff, sinf, cosf, fmaxf, ...) are used
// as they are; CUDA-only names map onto them.
// ---------------------------------------------------------------------------------------------------------
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __exp2f(float x) { return std::exp2(x); }
inline float __logf(float x) { return std::log(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __tanf(float x) { return std::tan(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : x > 1.0f ? 1.0f : x; }  // NaN -> 0 below
inline int __float2int_rn(float x) { return (int)std::nearbyint(x); }
inline int __float2int_rz(float x) { return (int)x; }
inline float __int2float_rn(int x) { return (float)x; }
inline unsigned __float_as_uint(float x) { return emu::fbits(x); }
inline float __uint_as_float(unsigned x) { return emu::bitsf(x); }
inline int __float_as_int(float x) { return (int)emu::fbits(x); }
inline float __int_as_float(int x) { return emu::bitsf((uint32_t)x); }
// CUDA's integer / mixed min and max (the usual arithmetic conversions decide the type, as in CUDA).
template <class A, class B, class = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
inline std::common_type_t<A, B> min(A a, B b) {
    using C = std::common_type_t<A, B>;
    if constexpr (std::is_floating_point<C>::value) return std::fmin((C)a, (C)b);
    else return (C)b < (C)a ? (C)b : (C)a;
}
template <class A, class B, class = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
inline std::common_type_t<A, B> max(A a, B b) {
    using C = std::common_type_t<A, B>;
    if constexpr (std::is_floating_point<C>::value) return std::fmax((C)a, (C)b);
    else return (C)a < (C)b ? (C)b : (C)a;
}
// Read-only cache loads: plain loads (memcpy keeps them free of aliasing assumptions).
template <class T> inline T __ldg(const T* p) { T v; memcpy((void*)&v, (const void*)p, sizeof(T)); return v; }
inline void __threadfence() {}
inline void __threadfence_block() {}

// ---------------------------------------------------------------------------------------------------------
// Context switch
// ---------------------------------------------------------------------------------------------------------
#if defined(TOFFEE_EMU_CTX_X86_64)
#if defined(__CET__)
#define TOFFEE_EMU_ENDBR "endbr64\n"
#else
#define TOFFEE_EMU_ENDBR ""
#endif
// toffee_emu_switch(save, to): push the System V callee-saved registers on the current stack, store the stack
// pointer in *save, load `to` as the stack pointer, pop the same set, return. One copy per link (COMDAT group),
// hidden.
// MXCSR and the x87 control word are not switched: they belong to the OS thread, every fiber of a launch runs
// on the launching thread, and no kernel changes them, so each fiber simply sees the launching thread's
// settings. (Saving them cost a serialising ldmxcsr/fldcw pair per switch.)
asm(".pushsection .text.toffee_emu_switch,\"axG\",@progbits,toffee_emu_switch,comdat\n"
    ".weak toffee_emu_switch\n"
    ".hidden toffee_emu_switch\n"
    ".type toffee_emu_switch,@function\n"
    ".p2align 4\n"
    "toffee_emu_switch:\n" TOFFEE_EMU_ENDBR
    "pushq %rbp\n pushq %rbx\n pushq %r12\n pushq %r13\n pushq %r14\n pushq %r15\n"
    "movq %rsp, (%rdi)\n movq %rsi, %rsp\n"
    "popq %r15\n popq %r14\n popq %r13\n popq %r12\n popq %rbx\n popq %rbp\n"
    "ret\n"
    ".size toffee_emu_switch, .-toffee_emu_switch\n"
    ".popsection\n");
extern "C" void toffee_emu_switch(void** save, void* to);
#elif defined(TOFFEE_EMU_CTX_AARCH64)
// AAPCS64 callee-saved: x19-x28, x29 (fp), x30 (lr), d8-d15. 160-byte frame, sp stays 16-aligned. FPCR is not
// switched (see x86-64 above).
asm(".pushsection .text.toffee_emu_switch,\"axG\",@progbits,toffee_emu_switch,comdat\n"
    ".weak toffee_emu_switch\n"
    ".hidden toffee_emu_switch\n"
    ".type toffee_emu_switch,%function\n"
    ".p2align 4\n"
    "toffee_emu_switch:\n"
    "sub sp, sp, #160\n"
    "stp x19, x20, [sp, #0]\n stp x21, x22, [sp, #16]\n stp x23, x24, [sp, #32]\n"
    "stp x25, x26, [sp, #48]\n stp x27, x28, [sp, #64]\n stp x29, x30, [sp, #80]\n"
    "stp d8, d9, [sp, #96]\n stp d10, d11, [sp, #112]\n stp d12, d13, [sp, #128]\n stp d14, d15, [sp, #144]\n"
    "mov x9, sp\n str x9, [x0]\n mov sp, x1\n"
    "ldp x19, x20, [sp, #0]\n ldp x21, x22, [sp, #16]\n ldp x23, x24, [sp, #32]\n"
    "ldp x25, x26, [sp, #48]\n ldp x27, x28, [sp, #64]\n ldp x29, x30, [sp, #80]\n"
    "ldp d8, d9, [sp, #96]\n ldp d10, d11, [sp, #112]\n ldp d12, d13, [sp, #128]\n ldp d14, d15, [sp, #144]\n"
    "add sp, sp, #160\n"
    "ret\n"
    ".size toffee_emu_switch, .-toffee_emu_switch\n"
    ".popsection\n");
extern "C" void toffee_emu_switch(void** save, void* to);
#endif

namespace emu {
struct Ctx {
#if defined(TOFFEE_EMU_CTX_UCONTEXT)
    ucontext_t uc;
#else
    void* sp = nullptr;
#endif
};
inline void ctx_switch(Ctx& from, Ctx& to) {
#if defined(TOFFEE_EMU_CTX_UCONTEXT)
    swapcontext(&from.uc, &to.uc);
#else
    toffee_emu_switch(&from.sp, to.sp);
#endif
}
// A context that starts entry() (which must never return) on the stack [lo, lo + size).
inline void ctx_init(Ctx& c, unsigned char* lo, size_t size, void (*entry)()) {
#if defined(TOFFEE_EMU_CTX_UCONTEXT)
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = lo;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
#elif defined(TOFFEE_EMU_CTX_X86_64)
    uint64_t* sp = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(lo + size)) & ~(uintptr_t)15);
    *--sp = 0;                                  // entry's return address (it never returns)
    *--sp = reinterpret_cast<uint64_t>(entry);  // popped by `ret` in toffee_emu_switch
    for (int i = 0; i < 6; ++i) *--sp = 0;      // rbp rbx r12 r13 r14 r15
    c.sp = sp;
#else  // aarch64
    uint64_t* top = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(lo + size)) & ~(uintptr_t)15);
    uint64_t* sp = top - 20;  // 160 bytes
    memset(sp, 0, 160);
    sp[11] = reinterpret_cast<uint64_t>(entry);  // x30
    c.sp = sp;
#endif
}

// ---------------------------------------------------------------------------------------------------------
// Runtime state (one per OS thread)
// ---------------------------------------------------------------------------------------------------------
#ifndef TOFFEE_EMU_STACK_KIB
#define TOFFEE_EMU_STACK_KIB 64
#endif
constexpr size_t kStackBytes = (size_t)TOFFEE_EMU_STACK_KIB << 10;  // per CUDA thread, canary included
constexpr size_t kGuardBytes = 4096;                                 // PROT_NONE page below each stack
constexpr size_t kSlotBytes = kGuardBytes + kStackBytes;
// Fiber i's stack starts (i % 16) * kColorBytes below the top of its slot. Identically laid-out stacks put
// every fiber's saved registers at the same address modulo 4 KiB, so the pops of a switch falsely depend on
// the pushes just made to the other stack (4K aliasing) and all fibers' hot lines share a few L1 sets;
// staggering them measured 5-15% faster on barrier-heavy kernels.
constexpr size_t kColorBytes = 256;
constexpr size_t kCanaryBytes = 256;                                 // pattern at the stack's low end
constexpr uint64_t kCanary = 0x5a17c0de5a17c0deull;
constexpr size_t kSmemLimit = 227 << 10;    // sm_90 per-block shared memory (static + dynamic)
constexpr size_t kStaticLimit = 48 << 10;   // static __shared__ per block
constexpr uint32_t kWindow = 0x400;         // shared-window address of the block's first byte (0 is invalid)
constexpr int kSlotWords = 8;

enum Kind : int { kNone = 0, kSyncThreads, kSyncWarp, kShfl, kVote, kLdmatrix, kMma };
inline const char* kind_name(int k) {
    switch (k) {
        case kSyncThreads: return "__syncthreads";
        case kSyncWarp: return "__syncwarp";
        case kShfl: return "a __shfl_*_sync";
        case kVote: return "a warp vote";
        case kLdmatrix: return "ldmatrix";
        case kMma: return "mma.sync";
        default: return "a barrier";
    }
}

struct Bar { int count = 0; unsigned gen = 0; int kind = kNone; };
struct Copy { unsigned char* dst; const unsigned char* src; uint32_t size, src_size; };
struct Fiber {
    Ctx ctx;
    unsigned char* mem = nullptr;  // slot in Runtime::stacks: guard page, then the stack
    unsigned char* stack = nullptr;
    uint3 tid{0, 0, 0};
    int lane = 0, warp = 0;
    unsigned index = 0;  // linear thread index in the block (bit in Runtime::ready / live)
    bool done = false;
    int wait_kind = kNone;  // what it last blocked at (named by the deadlock report)
    std::vector<Copy> copies;        // cp.async, copy-at-wait mode: issued, not yet landed (oldest first)
    std::vector<size_t> group_end;   // committed groups: end index into copies
    size_t copy_head = 0;
};
struct Warp {
    Bar bar;
    int alive = 0;
    uint32_t slot[2][32][kSlotWords];  // per-lane operands of a collective, double-buffered by bar.gen parity
    unsigned mma_gen = ~0u;            // generation whose product is in mma_d
    double mma_d[16][8];
};
constexpr unsigned kMaxThreads = 1024;
constexpr unsigned kMaskWords = kMaxThreads / 64;
struct Runtime {
    unsigned char* stacks = nullptr;  // kMaxThreads slots of kSlotBytes (reserved once, touched as used)
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    Ctx sched;
    Bar bar;  // __syncthreads
    int alive = 0;
    unsigned n = 0, nw = 0;
    // Scheduling. A fiber is runnable when its bit is set in `ready` (not finished, not blocked at a barrier);
    // `live` has the bits of the fibers that have not finished. Bit i is thread i of the block; bits >= n are 0.
    uint64_t ready[kMaskWords] = {}, live[kMaskWords] = {};
    // The reference schedule is a round-robin loop: each round visits the fibers in the schedule's order and
    // resumes every runnable one (schedule 3: warps in a shuffled order, each warp's lanes until none can run);
    // a round that resumes nothing is a deadlock. Fibers do not return to that loop between turns: a fiber
    // that blocks asks pick() for the next one and switches to it directly (one context switch per turn
    // instead of two), and pick() advances this cursor exactly as the loop would advance, so every mode
    // resumes fibers in the same sequence as the plain loop.
    int schedule = 0;
    std::mt19937 rng;
    std::vector<int> order;         // schedule 2: the round's random order of thread indices
    std::vector<unsigned> worder;   // schedule 3: the round's random order of warps
    unsigned pos = 0;               // schedules 0-2: next position in the round's order
    unsigned wi = 0, li = 0;        // schedule 3: position in worder, next lane of the current pass
    bool any = false;               // schedule 3: the current pass over warp worder[wi] resumed a lane
    bool progress = false;          // this round resumed a fiber
    // shared memory: [0, dyn) dynamic, then static objects; filled with 0xFF bytes for every block
    unsigned char* smem = nullptr;
    size_t smem_cap = 0, dyn = 0, static_top = 0, dirty = 0;
    std::vector<std::pair<const void*, size_t>> statics;
    // launch
    void (*thunk)(void*) = nullptr;
    void* arg = nullptr;
    bool cp_at_wait = false;
    bool aborted = false;
    char msg[480];
    bool fill_stacks = false;  // debug: pattern-fill whole stacks to measure their use

    ~Runtime() {
        if (stacks) munmap(stacks, kMaxThreads * kSlotBytes);
        if (smem) munmap(smem, smem_cap);
    }
};
struct RuntimeHolder {
    Runtime* p = nullptr;
    ~RuntimeHolder() { delete p; }
};
inline thread_local RuntimeHolder t_holder;
inline thread_local Runtime* t_rt = nullptr;
inline thread_local Fiber* cur = nullptr;
inline thread_local uint3 t_bid{0, 0, 0};
inline thread_local dim3 t_bdim, t_gdim;

inline Runtime& rt() { return *t_rt; }

// ---- errors: record, mark the launch aborted, return to the scheduler for good ----
inline void append_location(char* msg, size_t len) {
    size_t used = strlen(msg);
    if (!cur || used + 1 >= len) return;
    if (t_bdim.y == 1 && t_bdim.z == 1)
        snprintf(msg + used, len - used, " (block %u,%u,%u, thread %u)", t_bid.x, t_bid.y, t_bid.z, cur->tid.x);
    else
        snprintf(msg + used, len - used, " (block %u,%u,%u, thread %u,%u,%u)", t_bid.x, t_bid.y, t_bid.z, cur->tid.x,
                 cur->tid.y, cur->tid.z);
}
[[noreturn]] inline void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
[[noreturn]] inline void fail(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    if (!t_rt || !cur) __builtin_trap();  // an emulated device function called outside any launch
    Runtime& r = rt();
    vsnprintf(r.msg, sizeof r.msg, fmt, ap);
    va_end(ap);
    append_location(r.msg, sizeof r.msg);
    r.aborted = true;
    ctx_switch(cur->ctx, r.sched);
    __builtin_unreachable();  // the scheduler never resumes an aborted launch's fibers
}

// ---- scheduling ----
inline void begin_round(Runtime& r) {
    r.progress = false;
    r.pos = 0;
    r.wi = r.li = 0;
    r.any = false;
    if (r.schedule == 2) std::shuffle(r.order.begin(), r.order.end(), r.rng);
    if (r.schedule == 3) {
        for (unsigned w = 0; w < r.nw; ++w) r.worder[w] = w;
        std::shuffle(r.worder.begin(), r.worder.end(), r.rng);
    }
}
// The next fiber to resume (see Runtime), or nullptr when a whole round found nothing runnable: a deadlock if
// any fiber is still live.
inline Fiber* pick(Runtime& r) {
    const unsigned n = r.n;
    for (;;) {
        if (r.schedule == 3) {
            if (r.wi < r.nw) {
                unsigned w = r.worder[r.wi];
                uint32_t lanes = r.li < 32 ? (uint32_t)(r.ready[w >> 1] >> (32 * (w & 1))) & (~0u << r.li) : 0;
                if (lanes) {
                    unsigned l = (unsigned)__builtin_ctz(lanes);
                    r.li = l + 1;
                    r.any = r.progress = true;
                    return &r.fibers[32 * w + l];
                }
                if (r.any) r.any = false;  // the pass resumed someone: pass over this warp again
                else r.wi++;
                r.li = 0;
                continue;
            }
        } else if (r.pos < n) {
            int found = -1;
            if (r.schedule == 0) {  // lowest ready index >= pos
                unsigned k = r.pos >> 6;
                uint64_t m = r.ready[k] & (~0ull << (r.pos & 63));
                while (!m && ++k < (n + 63) / 64) m = r.ready[k];
                if (m) found = (int)(64 * k + __builtin_ctzll(m));
                r.pos = found < 0 ? n : (unsigned)found + 1;
            } else if (r.schedule == 1) {  // reverse: highest ready index <= n - 1 - pos
                unsigned top = n - 1 - r.pos, k = top >> 6;
                uint64_t m = r.ready[k] & ((top & 63) == 63 ? ~0ull : (2ull << (top & 63)) - 1);
                while (!m && k-- > 0) m = r.ready[k];
                if (m) found = (int)(64 * k + 63 - __builtin_clzll(m));
                r.pos = found < 0 ? n : n - (unsigned)found;
            } else {
                for (; r.pos < n && found < 0; ++r.pos) {
                    int i = r.order[r.pos];
                    if (r.ready[i >> 6] >> (i & 63) & 1) found = i;
                }
            }
            if (found >= 0) {
                r.progress = true;
                return &r.fibers[found];
            }
            continue;
        }
        // end of a round
        if (!r.progress) return nullptr;
        begin_round(r);
    }
}
// The current fiber stops here (blocked or finished: its ready bit is already clear) and the next one runs.
// With nothing left to run, control goes back to run(), which reports a deadlock if any fiber is live.
inline void switch_away(Fiber& f) {
    Runtime& r = rt();
    Fiber* g = r.alive > 0 ? pick(r) : nullptr;
    if (!g) {
        ctx_switch(f.ctx, r.sched);
        return;
    }
    cur = g;
    ctx_switch(f.ctx, g->ctx);
    // someone switched back to f and set cur = &f
}

// ---- barriers ----
// The last thread to arrive makes the waiters runnable again (`released`: their bits, 32 for a warp, or
// all live threads for the block) and passes straight through; the others clear their ready bit and switch
// away. A barrier can only complete once every thread it waits for has arrived, so the released threads are
// exactly the ones blocked on it.
inline void arrive(Bar& b, int expected, int kind, int warp) {
    if (b.count == 0) b.kind = kind;
    else if (b.kind != kind)
        fail("warp collective mismatch: this thread is at %s while others of its warp wait at %s",
             kind_name(kind), kind_name(b.kind));
    Runtime& r = rt();
    if (++b.count >= expected) {
        b.count = 0;
        b.gen++;
        if (warp < 0) memcpy(r.ready, r.live, sizeof r.ready);
        else r.ready[warp >> 1] |= r.live[warp >> 1] & (0xffffffffull << (32 * (warp & 1)));
        return;
    }
    Fiber& f = *cur;
    f.wait_kind = kind;
    r.ready[f.index >> 6] &= ~(1ull << (f.index & 63));
    switch_away(f);
}
// Every thread of the block must reach each __syncthreads (CUDA: a __syncthreads in divergent code is
// undefined); a thread that has exited never arrives, so the others report a deadlock.
inline void syncthreads() { Runtime& r = rt(); arrive(r.bar, (int)r.n, kSyncThreads, -1); }
inline Warp& my_warp() { return rt().warps[cur->warp]; }
inline void check_full_warp(unsigned mask, const char* what) {
    if (mask != 0xffffffffu) fail("%s with a partial mask 0x%08x (only full-warp masks are emulated)", what, mask);
    Warp& w = my_warp();
    if (w.alive != 32)
        fail("%s with a full mask but only %d live lanes in the warp (partial warp or exited lanes)", what, w.alive);
}
inline void syncwarp(int kind) { arrive(my_warp().bar, 32, kind, cur->warp); }

// ---- cp.async ----
inline void land(const Copy& c) {
    memcpy(c.dst, c.src, c.src_size);
    if (c.size > c.src_size) memset(c.dst + c.src_size, 0, c.size - c.src_size);
}
inline void land_all(Fiber& f) {
    for (size_t i = f.copy_head; i < f.copies.size(); ++i) land(f.copies[i]);
    f.copies.clear();
    f.group_end.clear();
    f.copy_head = 0;
}

// ---- stacks ----
inline bool canary_ok(const Fiber& f, size_t bytes) {
    const unsigned char* p = f.stack + kCanaryBytes - bytes;
    for (size_t i = 0; i < bytes; i += 8) {
        uint64_t v;
        memcpy(&v, p + i, 8);
        if (v != kCanary) return false;
    }
    return true;
}
inline void fill_canary(Fiber& f, size_t bytes) {
    for (size_t i = 0; i < bytes; i += 8) memcpy(f.stack + i, &kCanary, 8);
}
inline void fiber_entry();

// ---- thread exit ----
inline void finish() {
    Runtime& r = rt();
    Fiber& f = *cur;
    land_all(f);  // outstanding cp.async still land
    f.done = true;
    r.alive--;
    r.ready[f.index >> 6] &= ~(1ull << (f.index & 63));
    r.live[f.index >> 6] &= ~(1ull << (f.index & 63));
    Warp& w = r.warps[f.warp];
    w.alive--;
    if (w.bar.count > 0)
        fail("thread exited while %d lanes of its warp wait at %s (partial-warp collective)", w.bar.count,
             kind_name(w.bar.kind));
    if (r.bar.count > 0)
        fail("thread exited while %d threads wait at __syncthreads (a __syncthreads not reached by every thread of "
             "the block)", r.bar.count);
    if (!canary_ok(f, 64)) fail("fiber stack overflow (over %zu KiB of stack)", kStackBytes >> 10);
    switch_away(f);
    __builtin_unreachable();  // nothing resumes a finished fiber
}
inline void fiber_entry() {
    Runtime& r = rt();
    r.thunk(r.arg);
    finish();
}

// ---- shared memory ----
inline unsigned char* dyn_smem() { return rt().smem; }
// static `__shared__ [__align__(N)] T name[dims];` is rewritten to
//   T (&name)[dims] = *::emu::shared_var<T[dims], N>(tag)   (tag: address unique to the declaration)
template <class A, size_t Align>
inline A* shared_var(const void* tag) {
    Runtime& r = rt();
    for (auto& e : r.statics)
        if (e.first == tag) return reinterpret_cast<A*>(r.smem + e.second);
    size_t off = (r.static_top + Align - 1) / Align * Align;
    size_t top = off + sizeof(A);
    if (top - r.dyn > kStaticLimit)
        fail("static __shared__ memory exceeds 48 KiB (%zu bytes after this %zu-byte object)", top - r.dyn, sizeof(A));
    if (top > kSmemLimit)
        fail("static + dynamic shared memory exceeds 227 KiB (%zu dynamic + %zu static bytes)", r.dyn, top - r.dyn);
    r.statics.push_back({tag, off});
    r.static_top = top;
    if (top > r.dirty) r.dirty = top;
    return reinterpret_cast<A*>(r.smem + off);
}
// Generic -> shared-window address (what __cvta_generic_to_shared gives; the window starts at kWindow).
inline uint32_t to_shared(const void* p) {
    Runtime& r = rt();
    const unsigned char* c = static_cast<const unsigned char*>(p);
    if (c < r.smem || c > r.smem + r.static_top)
        fail("__cvta_generic_to_shared: %p is not in this block's shared memory", p);
    return (uint32_t)(c - r.smem) + kWindow;
}
// Shared-window address -> pointer, checking that [a, a + len) lies inside the block's shared memory.
inline unsigned char* from_shared(uint32_t a, size_t len, const char* what) {
    Runtime& r = rt();
    if (a < kWindow || (size_t)(a - kWindow) + len > r.static_top)
        fail("%s: shared address 0x%x (+%zu bytes) outside the block's %zu bytes of shared memory", what, a, len,
             r.static_top);
    return r.smem + (a - kWindow);
}

// ---- warp collectives ----
// Every lane writes its operand into the slot buffer of the barrier's current generation, passes the barrier,
// then reads what it needs; the next collective uses the other buffer, so no second barrier is needed.
template <class T>
inline T shfl_from(T v, int src) {
    static_assert(sizeof(T) <= sizeof(uint32_t) * kSlotWords, "shuffle of a large type");
    Warp& w = my_warp();
    unsigned p = w.bar.gen & 1;
    memcpy(w.slot[p][cur->lane], &v, sizeof(T));
    syncwarp(kShfl);
    T r;
    memcpy(&r, w.slot[p][src], sizeof(T));
    return r;
}
inline unsigned ballot(bool pred) {
    Warp& w = my_warp();
    unsigned p = w.bar.gen & 1;
    w.slot[p][cur->lane][0] = pred;
    syncwarp(kVote);
    unsigned m = 0;
    for (int l = 0; l < 32; ++l) m |= (w.slot[p][l][0] ? 1u : 0u) << l;
    return m;
}

// ---- launch ----
inline Runtime& runtime_for_launch() {
    if (!t_rt) {
        t_holder.p = new Runtime();
        t_rt = t_holder.p;
        t_rt->fibers.reserve(1024);
        t_rt->smem_cap = kSmemLimit + 4096;
        void* m = mmap(nullptr, t_rt->smem_cap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        t_rt->smem = m == MAP_FAILED ? nullptr : static_cast<unsigned char*>(m);
        if (t_rt->smem) memset(t_rt->smem, 0xff, t_rt->smem_cap);
        t_rt->dirty = 0;
    }
    return *t_rt;
}
inline bool grow_fibers(Runtime& r, unsigned n) {
    if (!r.stacks) {
        void* m = mmap(nullptr, kMaxThreads * kSlotBytes, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) return false;
        r.stacks = static_cast<unsigned char*>(m);
    }
    while (r.fibers.size() < n) {
        r.fibers.emplace_back();
        Fiber& f = r.fibers.back();
        f.mem = r.stacks + (r.fibers.size() - 1) * kSlotBytes;
        mprotect(f.mem, kGuardBytes, PROT_NONE);  // gross overflows fault instead of corrupting a neighbour
        f.stack = f.mem + kGuardBytes;
        fill_canary(f, kCanaryBytes);
    }
    return true;
}
// Debug aid: pattern-fill every stack so that stack_high_water() can measure the deepest use.
inline void debug_fill_stacks(unsigned n) {
    Runtime& r = runtime_for_launch();
    if (!grow_fibers(r, n)) return;
    for (auto& f : r.fibers) fill_canary(f, kStackBytes);
    r.fill_stacks = true;
}
inline size_t stack_high_water() {
    if (!t_rt) return 0;
    size_t worst = 0;
    for (auto& f : t_rt->fibers) {
        size_t i = 0;
        while (i + 8 <= kStackBytes) {
            uint64_t v;
            memcpy(&v, f.stack + i, 8);
            if (v != kCanary) break;
            i += 8;
        }
        worst = std::max(worst, kStackBytes - i);
    }
    return worst;
}

inline int set_error(char* err, size_t len, const char* fmt, ...) __attribute__((format(printf, 3, 4)));
inline int set_error(char* err, size_t len, const char* fmt, ...) {
    if (err && len) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, len, fmt, ap);
        va_end(ap);
    }
    return 1;
}

// Runs thunk(arg) as every thread of every block. Returns 0, or 1 with a message in err.
inline int run(const char* name, emu_dim3 grid, emu_dim3 block, uint32_t dyn, const emu_mode* mode,
               void (*thunk)(void*), void* arg, char* err, size_t err_len) {
    if (err && err_len) err[0] = 0;
    uint64_t n64 = (uint64_t)block.x * block.y * block.z;
    if (n64 == 0 || n64 > 1024)
        return set_error(err, err_len, "%s: invalid launch: block %ux%ux%u has %llu threads (1..1024 allowed)", name,
                         block.x, block.y, block.z, (unsigned long long)n64);
    if (block.z > 64)
        return set_error(err, err_len, "%s: invalid launch: block.z = %u > 64", name, block.z);
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535)
        return set_error(err, err_len,
                         "%s: invalid launch: grid %ux%ux%u (x in 1..2^31-1, y and z in 1..65535 allowed)", name,
                         grid.x, grid.y, grid.z);
    if (dyn > kSmemLimit)
        return set_error(err, err_len, "%s: invalid launch: %u bytes of dynamic shared memory (at most %zu)", name,
                         dyn, kSmemLimit);
    Runtime& r = runtime_for_launch();
    if (cur)  // a launch from inside a kernel
        return set_error(err, err_len, "%s: launch from inside an emulated kernel is not supported", name);
    const unsigned n = (unsigned)n64, nw = (n + 31) / 32;
    if (!r.smem || !grow_fibers(r, n))
        return set_error(err, err_len, "%s: out of memory for fiber stacks / shared memory", name);
    emu_mode m = mode ? *mode : emu_mode{0, 0, 0};
    if (m.schedule < 0 || m.schedule > 3)
        return set_error(err, err_len, "%s: unknown schedule %d", name, m.schedule);

    r.n = n;
    r.nw = nw;
    r.schedule = m.schedule;
    r.rng.seed(m.seed);
    r.thunk = thunk;
    r.arg = arg;
    r.cp_at_wait = m.cp_async_at_wait != 0;
    r.aborted = false;
    r.dyn = dyn;
    if (dyn > r.dirty) r.dirty = dyn;
    r.warps.resize(nw);
    r.order.resize(n);
    r.worder.resize(nw);
    for (unsigned i = 0; i < n; ++i) {
        Fiber& f = r.fibers[i];
        f.tid = {i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
        f.lane = (int)(i & 31);
        f.warp = (int)(i >> 5);
        f.index = i;
        r.order[i] = (int)i;
    }
    t_bdim = dim3(block.x, block.y, block.z);
    t_gdim = dim3(grid.x, grid.y, grid.z);

    const uint64_t nblocks = (uint64_t)grid.x * grid.y * grid.z;
    int rc = 0;
    for (uint64_t bi = 0; bi < nblocks && rc == 0; ++bi) {
        uint64_t lin = m.schedule == 1 ? nblocks - 1 - bi : bi;  // reverse: blocks in reverse order too
        t_bid = {(unsigned)(lin % grid.x), (unsigned)((lin / grid.x) % grid.y), (unsigned)(lin / ((uint64_t)grid.x * grid.y))};
        memset(r.smem, 0xff, r.dirty);  // poison: NaN as fp16, bf16 and f32
        r.dirty = dyn;
        r.static_top = dyn;
        r.statics.clear();
        r.alive = (int)n;
        r.bar = Bar{};
        for (unsigned w = 0; w < nw; ++w) {
            r.warps[w].bar = Bar{};
            r.warps[w].alive = (int)std::min(32u, n - 32 * w);
            r.warps[w].mma_gen = ~0u;
        }
        for (unsigned i = 0; i < n; ++i) {
            Fiber& f = r.fibers[i];
            f.done = false;
            f.wait_kind = kNone;
            f.copies.clear();
            f.group_end.clear();
            f.copy_head = 0;
            ctx_init(f.ctx, f.stack, kStackBytes - (i % 16) * kColorBytes, fiber_entry);
        }
        for (unsigned k = 0; k < kMaskWords; ++k) {
            unsigned lo = 64 * k;
            r.live[k] = n >= lo + 64 ? ~0ull : n > lo ? (1ull << (n - lo)) - 1 : 0;
            r.ready[k] = r.live[k];
        }
        // Run the block: the fibers pass control among themselves (switch_away) and come back here when all
        // have finished, nothing can run (deadlock) or one failed.
        begin_round(r);
        if (Fiber* f = pick(r)) {
            cur = f;
            ctx_switch(r.sched, f->ctx);
            cur = nullptr;
        }
        if (!r.aborted && r.alive > 0) {
            for (unsigned i = 0; i < n; ++i)
                if (!r.fibers[i].done) {  // name the first waiting thread
                    cur = &r.fibers[i];
                    snprintf(r.msg, sizeof r.msg, "deadlock: threads wait at barriers that cannot complete (%s)",
                             kind_name(cur->wait_kind));
                    append_location(r.msg, sizeof r.msg);
                    cur = nullptr;
                    break;
                }
            r.aborted = true;
        }
        if (r.aborted) rc = 1;
    }
    // A damaged canary anywhere explains whatever else went wrong: report it first.
    for (unsigned i = 0; i < n; ++i) {
        Fiber& f = r.fibers[i];
        if (!canary_ok(f, kCanaryBytes)) {
            snprintf(r.msg, sizeof r.msg, "fiber stack overflow (over %zu KiB of stack) in thread %u of some block",
                     kStackBytes >> 10, i);
            fill_canary(f, kCanaryBytes);
            rc = 1;
        }
    }
    r.thunk = nullptr;
    r.arg = nullptr;
    t_bid = {0, 0, 0};
    if (rc) return set_error(err, err_len, "%s: %s", name, r.msg);
    return 0;
}
}  // namespace emu

// ---------------------------------------------------------------------------------------------------------
// CUDA built-ins visible to kernels
// ---------------------------------------------------------------------------------------------------------
#define threadIdx (::emu::cur->tid)
#define blockIdx (::emu::t_bid)
#define blockDim (::emu::t_bdim)
#define gridDim (::emu::t_gdim)

inline void __syncthreads() { emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    emu::check_full_warp(mask, "__syncwarp");
    emu::syncwarp(emu::kSyncWarp);
}
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    emu::check_full_warp(mask, "__shfl_sync");
    int l = emu::cur->lane;
    return emu::shfl_from(v, (l & ~(width - 1)) + (src & (width - 1)));
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    emu::check_full_warp(mask, "__shfl_xor_sync");
    int l = emu::cur->lane, s = l ^ lane_mask;
    if ((s & ~(width - 1)) != (l & ~(width - 1)) || s > 31) s = l;
    return emu::shfl_from(v, s);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    emu::check_full_warp(mask, "__shfl_down_sync");
    int l = emu::cur->lane, s = l + (int)delta;
    if ((s & ~(width - 1)) != (l & ~(width - 1)) || s > 31) s = l;
    return emu::shfl_from(v, s);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    emu::check_full_warp(mask, "__shfl_up_sync");
    int l = emu::cur->lane, s = l - (int)delta;
    if (s < (l & ~(width - 1))) s = l;
    return emu::shfl_from(v, s);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
    emu::check_full_warp(mask, "__ballot_sync");
    return emu::ballot(pred != 0);
}
inline int __any_sync(unsigned mask, int pred) {
    emu::check_full_warp(mask, "__any_sync");
    return emu::ballot(pred != 0) != 0;
}
inline int __all_sync(unsigned mask, int pred) {
    emu::check_full_warp(mask, "__all_sync");
    return emu::ballot(pred != 0) == 0xffffffffu;
}
inline size_t __cvta_generic_to_shared(const void* p) { return emu::to_shared(p); }
// Atomics: fibers of a launch run one at a time on one OS thread, so plain read-modify-write is atomic.
template <class T> inline T atomicAdd(T* p, T v) { T o = *p; *p = o + v; return o; }
template <class T> inline T atomicSub(T* p, T v) { T o = *p; *p = o - v; return o; }
template <class T> inline T atomicExch(T* p, T v) { T o = *p; *p = v; return o; }
template <class T> inline T atomicMax(T* p, T v) { T o = *p; *p = o < v ? v : o; return o; }
template <class T> inline T atomicMin(T* p, T v) { T o = *p; *p = v < o ? v : o; return o; }
template <class T> inline T atomicCAS(T* p, T cmp, T v) { T o = *p; if (o == cmp) *p = v; return o; }

// ---------------------------------------------------------------------------------------------------------
// Emulated inline PTX (kernels/tensor_core.cuh calls these in its TOFFEE_EMU branch)
// ---------------------------------------------------------------------------------------------------------
namespace emu {
// cp.async.cg.shared.global [dst], [src], 16, src_size: src_size bytes copied, the rest of the 16 zero-filled.
inline void cp_async16(uint32_t dst, const void* src, uint32_t src_size) {
    if (dst % 16) fail("cp.async: shared destination 0x%x not 16-byte aligned", dst);
    if (reinterpret_cast<uintptr_t>(src) % 16) fail("cp.async: global source %p not 16-byte aligned", src);
    if (src_size > 16) fail("cp.async: src-size %u > 16", src_size);
    Copy c{from_shared(dst, 16, "cp.async"), static_cast<const unsigned char*>(src), 16, src_size};
    if (rt().cp_at_wait) cur->copies.push_back(c);
    else land(c);
}
inline void cp_async_commit() {
    if (rt().cp_at_wait) cur->group_end.push_back(cur->copies.size());
}
// cp.async.wait_group n: all but the n most recent committed groups have landed.
inline void cp_async_wait(int n) {
    Fiber& f = *cur;
    if (!rt().cp_at_wait) return;
    size_t groups = f.group_end.size();
    if ((int)groups <= n) return;
    size_t upto = f.group_end[groups - 1 - n];
    for (size_t i = f.copy_head; i < upto; ++i) land(f.copies[i]);
    f.copy_head = upto;
    f.group_end.erase(f.group_end.begin(), f.group_end.begin() + (groups - n));
    if (f.copy_head == f.copies.size()) {  // everything landed
        f.copies.clear();
        f.copy_head = 0;
    } else if (f.copy_head >= 64) {  // drop landed copies now and then
        f.copies.erase(f.copies.begin(), f.copies.begin() + f.copy_head);
        for (auto& e : f.group_end) e -= f.copy_head;
        f.copy_head = 0;
    }
}
// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16: lanes 8i..8i+7 give the 16-byte row addresses of matrix i;
// register i of lane l gets row l/4, elements 2(l%4), 2(l%4)+1 of matrix i (.trans: of its transpose).
inline void ldsm_x4(uint32_t (&r)[4], uint32_t addr, bool trans) {
    check_full_warp(0xffffffffu, trans ? "ldmatrix.x4.trans" : "ldmatrix.x4");
    if (addr % 16) fail("ldmatrix: row address 0x%x not 16-byte aligned", addr);
    from_shared(addr, 16, "ldmatrix");  // range check of this lane's row
    Warp& w = my_warp();
    unsigned p = w.bar.gen & 1;
    w.slot[p][cur->lane][0] = addr;
    syncwarp(kLdmatrix);
    Runtime& rr = rt();
    const int l = cur->lane;
    for (int i = 0; i < 4; ++i) {
        if (!trans) {
            memcpy(&r[i], rr.smem + (w.slot[p][8 * i + l / 4][0] - kWindow) + (l % 4) * 4, 4);
        } else {
            uint16_t e[2];
            for (int j = 0; j < 2; ++j)
                memcpy(&e[j], rr.smem + (w.slot[p][8 * i + 2 * (l % 4) + j][0] - kWindow) + (l / 4) * 2, 2);
            r[i] = e[0] | ((uint32_t)e[1] << 16);
        }
    }
}
// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 with the PTX ISA fragment layouts:
//   A (16x16): register j of lane l (g = l/4, t = l%4) holds row g + 8(j%2), columns 2t + 8(j/2) + {0,1}
//   B (16x8):  register j holds rows (k) 2t + 8j + {0,1}, column g
//   C/D (16x8): element e holds row g + 8(e/2), column 2t + e%2
// The first lane past the barrier computes the warp's 16x8 product (exact products, summed in double); each
// lane then adds its accumulator and rounds once. Hardware truncates differently: agreement is to a few
// fp32 ulps, not bit for bit.
template <bool BF16>
inline void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    check_full_warp(0xffffffffu, "mma.sync");
    Warp& w = my_warp();
    unsigned p = w.bar.gen & 1;
    uint32_t* s = w.slot[p][cur->lane];
    s[0] = a[0], s[1] = a[1], s[2] = a[2], s[3] = a[3], s[4] = b0, s[5] = b1;
    syncwarp(kMma);
    if (w.mma_gen != w.bar.gen) {
        w.mma_gen = w.bar.gen;
        auto cvt = [](uint32_t reg, int hi) {
            uint16_t h = (uint16_t)(hi ? reg >> 16 : reg);
            return (double)(BF16 ? b2f(h) : h2f(h));
        };
        double A[16][16], B[16][8];
        for (int l = 0; l < 32; ++l) {
            const uint32_t* q = w.slot[p][l];
            int g = l >> 2, t = l & 3;
            for (int j = 0; j < 4; ++j)
                for (int h = 0; h < 2; ++h) A[g + 8 * (j & 1)][2 * t + 8 * (j >> 1) + h] = cvt(q[j], h);
            for (int j = 0; j < 2; ++j)
                for (int h = 0; h < 2; ++h) B[2 * t + 8 * j + h][g] = cvt(q[4 + j], h);
        }
        for (int i = 0; i < 16; ++i)
            for (int j = 0; j < 8; ++j) {
                double acc = 0.0;
                for (int k = 0; k < 16; ++k) acc += A[i][k] * B[k][j];
                w.mma_d[i][j] = acc;
            }
    }
    const int g = cur->lane >> 2, t = cur->lane & 3;
    for (int e = 0; e < 4; ++e) c[e] = (float)(w.mma_d[g + 8 * (e >> 1)][2 * t + (e & 1)] + (double)c[e]);
}
}  // namespace emu

// ---------------------------------------------------------------------------------------------------------
// Registry: TOFFEE_EMU_MODULE(name, TOFFEE_EMU_KERNEL(k1) TOFFEE_EMU_KERNEL(k2) ...)
// ---------------------------------------------------------------------------------------------------------
namespace emu {
template <class T> struct dependent_false : std::false_type {};
template <class T>
constexpr char kind_of() {
    if constexpr (std::is_pointer<T>::value) return 'p';
    else if constexpr (std::is_same<T, float>::value) return 'f';
    else if constexpr (std::is_integral<T>::value && sizeof(T) == 4) return 'i';
    else if constexpr (std::is_integral<T>::value && sizeof(T) == 8) return 'l';
    else static_assert(dependent_false<T>::value, "kernel parameter type without an ABI kind");
    return '?';
}
inline const char* kind_word(char k) {
    switch (k) {
        case 'p': return "'p' (pointer)";
        case 'i': return "'i' (int32)";
        case 'l': return "'l' (int64)";
        case 'f': return "'f' (float)";
        default: return "an unknown kind";
    }
}
template <class... A> struct kinds_str {
    static constexpr char value[sizeof...(A) + 1] = {kind_of<std::decay_t<A>>()..., 0};
};
template <class... A> constexpr const char* kinds_of(void (*)(A...)) { return kinds_str<A...>::value; }
template <class Tuple, size_t... I>
inline void load_args(Tuple& t, const void* const* args, std::index_sequence<I...>) {
    (memcpy((void*)&std::get<I>(t), args[I], sizeof(std::tuple_element_t<I, Tuple>)), ...);
}
template <auto F, class... A>
inline int launch_typed(void (*)(A...), const char* name, emu_dim3 grid, emu_dim3 block, uint32_t dyn,
                        const emu_mode* mode, const void* const* args, const char* kinds, size_t nargs, char* err,
                        size_t err_len) {
    constexpr size_t N = sizeof...(A);
    constexpr char expect[N + 1] = {kind_of<std::decay_t<A>>()..., 0};
    if (nargs != N)
        return set_error(err, err_len, "%s: %zu arguments given, the kernel takes %zu", name, nargs, N);
    for (size_t i = 0; i < N; ++i)
        if (!kinds || kinds[i] != expect[i])
            return set_error(err, err_len, "%s: argument %zu: expected kind %s, given %s", name, i,
                             kind_word(expect[i]), kind_word(kinds ? kinds[i] : 0));
    std::tuple<std::decay_t<A>...> vals;
    load_args(vals, args, std::index_sequence_for<A...>{});
    auto body = [&vals]() { std::apply(F, vals); };
    using Body = decltype(body);
    return run(name, grid, block, dyn, mode, [](void* p) { (*static_cast<Body*>(p))(); }, &body, err, err_len);
}
}  // namespace emu

#define TOFFEE_EMU_KERNEL(fn)                                                                                 \
    emu_kernel{#fn, [](emu_dim3 g_, emu_dim3 b_, uint32_t s_, const emu_mode* m_, const void* const* a_,      \
                       const char* k_, size_t n_, char* e_, size_t el_) -> int {                              \
                   return ::emu::launch_typed<&fn>(&fn, #fn, g_, b_, s_, m_, a_, k_, n_, e_, el_);            \
               },                                                                                              \
               ::emu::kinds_of(&fn)},
#define TOFFEE_EMU_MODULE(mod, ...)                                                                           \
    extern "C" const emu_kernel* toffee_emu_module_##mod(size_t* count) {                                    \
        static const emu_kernel table[] = {__VA_ARGS__};                                                      \
        if (count) *count = sizeof(table) / sizeof(table[0]);                                                 \
        return table;                                                                                         \
    }

#endif  // TOFFEE_EMU_H
