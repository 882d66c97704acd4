// Launch ABI of the CPU emulation of kernels/*.cu (TOFFEE_EMU builds). Plain C: the Rust side mirrors it.
// Each rewritten kernel translation unit ends with
//   TOFFEE_EMU_MODULE(name, TOFFEE_EMU_KERNEL(k1) TOFFEE_EMU_KERNEL(k2) ...)
// which defines  extern "C" const emu_kernel* toffee_emu_module_<name>(size_t* count)  (macros in emu.h).
#ifndef TOFFEE_EMU_REGISTRY_H
#define TOFFEE_EMU_REGISTRY_H
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct emu_dim3 { uint32_t x, y, z; } emu_dim3;

// Per-launch checking modes.
//   cp_async_at_wait: 0 = cp.async copies land at issue (exposes write-after-read hazards),
//                     1 = they land at the issuing thread's cp.async.wait_group (exposes missing waits).
//   schedule: 0 = in order, 1 = reverse (threads and blocks), 2 = random (seeded), 3 = warp-skewed (seeded:
//             warps in random order, each run as far as it can before the next).
typedef struct emu_mode { int cp_async_at_wait; int schedule; uint32_t seed; } emu_mode;

// Launches one kernel to completion on the calling OS thread. args[i] points to the i-th argument's value;
// kinds[i] is 'p' (8-byte device pointer), 'i' (int32), 'l' (int64, CUDA `long`), 'f' (float). mode may be
// NULL (copy at issue, in order). Returns 0 on success; else non-zero with a NUL-terminated message in err
// (at most err_len bytes).
typedef int (*emu_launch_fn)(emu_dim3 grid, emu_dim3 block, uint32_t dyn_smem, const emu_mode* mode,
                             const void* const* args, const char* kinds, size_t nargs, char* err, size_t err_len);

// kinds: the kernel's parameter kinds as above, NUL-terminated (the signature, checked at load).
typedef struct emu_kernel { const char* name; emu_launch_fn launch; const char* kinds; } emu_kernel;

#ifdef __cplusplus
}
#endif
#endif
