// Included by build.rs (which passes the list to nvcc and to the software GPU's compiler as
// TOFFEE_FLASH_DIMS) and by the crate (src/backend/cuda/kernels.rs): the head dims the attention
// kernels of kernels/attention.cu and kernels/flash_tc.cu are instantiated for, written once.

/// Head dims with a flash-attention kernel (SD1.5: 40/80/160, SDXL and ViTs: 64, SD2: 64/128).
pub const FLASH_DIMS: [usize; 5] = [40, 64, 80, 128, 160];
