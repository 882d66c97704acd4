//! Every kernel of kernels/*.cu, declared once: its module, storage types, head dims, argument
//! types and block size. The table generates a typed launcher per kernel (a wrong argument at a
//! launch site fails to compile) and the list of kernels both devices load at open, with their
//! argument kinds: a name missing from a module fails there (`every_kernel_name_is_embedded`
//! checks the fatbins), and the software GPU refuses a launcher whose argument types differ from
//! the kernel's C++ parameters, for every kernel at every open.

use super::driver::KernelSpec;
use super::{Arg, DType, Gpu};

include!("../../../kernels/dims.rs");

/// A launcher argument type's kind in `KernelSpec::args`.
trait ArgKind {
    const KIND: u8;
}
impl ArgKind for u64 {
    const KIND: u8 = b'p';
}
impl ArgKind for i32 {
    const KIND: u8 = b'i';
}
impl ArgKind for i64 {
    const KIND: u8 = b'l';
}
impl ArgKind for f32 {
    const KIND: u8 = b'f';
}

impl From<u64> for Arg {
    fn from(v: u64) -> Arg {
        Arg::P(v)
    }
}
impl From<i32> for Arg {
    fn from(v: i32) -> Arg {
        Arg::I(v)
    }
}
impl From<i64> for Arg {
    fn from(v: i64) -> Arg {
        Arg::L(v)
    }
}
impl From<f32> for Arg {
    fn from(v: f32) -> Arg {
        Arg::F(v)
    }
}

/// Dynamic shared memory of the tensor-core flash kernel for head dim `d` (kernels/flash_tc.cu's
/// `Cfg<D>::SMEM_BYTES`): four key/value tiles of BC rows, each row padded to a multiple of 16
/// plus an 8-half skew.
pub fn flash_tc_smem(d: usize) -> u32 {
    let pitch = d.div_ceil(16) * 16 + 8;
    let bc = if d <= 128 { 64 } else { 32 };
    (4 * bc * pitch * 2) as u32
}

/// The kernel's name for `dtype` among `(suffix, name)` pairs; a missing one is recorded on `g`.
fn pick(g: &Gpu, names: &[(&'static str, &'static str)], dtype: DType) -> Option<&'static str> {
    let found = names
        .iter()
        .find(|(s, _)| *s == dtype.suffix())
        .map(|p| p.1);
    if found.is_none() {
        g.fail(format!("no {:?} instance of kernel {}", dtype, names[0].1));
    }
    found
}

/// Declares the kernels. Per entry: `name in "module" [types] block N (args)` for kernels
/// instantiated per storage type (`name_f16`, …); with `dims smem F` for one instance per head dim
/// of FLASH_DIMS (`name_d64_f16`, opting into F(d) bytes of dynamic shared memory); without
/// `[types]` for a kernel with one name. `block dyn` takes the block size at the call; otherwise
/// the table's block size is the launch's.
macro_rules! kernels {
    ($(
        $(#[$doc:meta])*
        $kernel:ident in $module:literal $([$($t:ident),+])? $(dims smem $smem:ident)?
            block $block:tt ($($arg:ident: $ty:ty),* $(,)?);
    )*) => {
        $(kernels!(@one $(#[$doc])* $kernel [$($($t),+)?] [$($smem)?] $block ($($arg: $ty),*));)*

        /// Every kernel the backend launches, with its module and shared-memory opt-in.
        pub fn specs() -> Vec<KernelSpec> {
            let mut v = Vec::new();
            $(kernels!(@spec v $kernel $module [$($($t),+)?] [$($smem)?]
                &[$(<$ty as ArgKind>::KIND),*]);)*
            v
        }
    };
    (@one $(#[$doc:meta])* $kernel:ident [] [] dyn ($($arg:ident: $ty:ty),*)) => {
        $(#[$doc])*
        #[allow(clippy::too_many_arguments)]
        pub fn $kernel(g: &Gpu, grid: (u32, u32), block: u32, $($arg: $ty),*) {
            g.launch_smem(stringify!($kernel), grid, block, 0, &[$(Arg::from($arg)),*]);
        }
    };
    (@one $(#[$doc:meta])* $kernel:ident [] [] $block:literal ($($arg:ident: $ty:ty),*)) => {
        $(#[$doc])*
        #[allow(clippy::too_many_arguments)]
        pub fn $kernel(g: &Gpu, grid: (u32, u32), $($arg: $ty),*) {
            g.launch_smem(stringify!($kernel), grid, $block, 0, &[$(Arg::from($arg)),*]);
        }
    };
    (@one $(#[$doc:meta])* $kernel:ident [$($t:ident),+] [] dyn ($($arg:ident: $ty:ty),*)) => {
        $(#[$doc])*
        #[allow(clippy::too_many_arguments)]
        pub fn $kernel(g: &Gpu, dtype: DType, grid: (u32, u32), block: u32, $($arg: $ty),*) {
            const NAMES: &[(&str, &str)] =
                &[$((stringify!($t), concat!(stringify!($kernel), "_", stringify!($t)))),+];
            if let Some(name) = pick(g, NAMES, dtype) {
                g.launch_smem(name, grid, block, 0, &[$(Arg::from($arg)),*]);
            }
        }
    };
    (@one $(#[$doc:meta])* $kernel:ident [$($t:ident),+] [] $block:literal ($($arg:ident: $ty:ty),*)) => {
        $(#[$doc])*
        #[allow(clippy::too_many_arguments)]
        pub fn $kernel(g: &Gpu, dtype: DType, grid: (u32, u32), $($arg: $ty),*) {
            const NAMES: &[(&str, &str)] =
                &[$((stringify!($t), concat!(stringify!($kernel), "_", stringify!($t)))),+];
            if let Some(name) = pick(g, NAMES, dtype) {
                g.launch_smem(name, grid, $block, 0, &[$(Arg::from($arg)),*]);
            }
        }
    };
    (@one $(#[$doc:meta])* $kernel:ident [$($t:ident),+] [$smem:ident] $block:literal ($($arg:ident: $ty:ty),*)) => {
        $(#[$doc])*
        #[allow(clippy::too_many_arguments)]
        pub fn $kernel(g: &Gpu, dtype: DType, d: usize, grid: (u32, u32), $($arg: $ty),*) {
            if !FLASH_DIMS.contains(&d) {
                g.fail(format!("no head dim {d} instance of {}", stringify!($kernel)));
                return;
            }
            let name = format!("{}_d{d}_{}", stringify!($kernel), dtype.suffix());
            g.launch_smem(&name, grid, $block, $smem(d), &[$(Arg::from($arg)),*]);
        }
    };
    (@spec $v:ident $kernel:ident $module:literal [] [] $args:expr) => {
        $v.push(KernelSpec {
            module: $module,
            name: stringify!($kernel).into(),
            args: $args,
            max_smem: None,
        });
    };
    (@spec $v:ident $kernel:ident $module:literal [$($t:ident),+] [] $args:expr) => {
        $($v.push(KernelSpec {
            module: $module,
            name: concat!(stringify!($kernel), "_", stringify!($t)).into(),
            args: $args,
            max_smem: None,
        });)+
    };
    (@spec $v:ident $kernel:ident $module:literal [$($t:ident),+] [$smem:ident] $args:expr) => {
        for d in FLASH_DIMS {
            $($v.push(KernelSpec {
                module: $module,
                name: format!("{}_d{d}_{}", stringify!($kernel), stringify!($t)),
                args: $args,
                max_smem: ($smem(d) > super::driver::DEFAULT_SMEM).then_some($smem(d)),
            });)+
        }
    };
}

/// The two flash-attention launchers' signature (same arguments, per head dim).
pub type Flash = fn(
    &Gpu,
    DType,
    usize,
    (u32, u32),
    u64,
    u64,
    u64,
    u64,
    i32,
    i32,
    i32,
    i64,
    i64,
    i64,
    i64,
    f32,
    i32,
);

/// No dynamic shared memory (the simple flash kernel's tiles are static).
fn no_smem(_d: usize) -> u32 {
    0
}

kernels! {
    // kernels/attention.cu
    /// The simple (CUDA-core) flash attention: 16 query rows a block.
    flash_attention in "attention" [f16, bf16] dims smem no_smem block 128
        (q: u64, k: u64, v: u64, o: u64, heads: i32, lq: i32, lk: i32, sq: i64, sk: i64, sv: i64,
         so: i64, scale: f32, causal: i32);
    attn_scores in "attention" [f16, bf16] block 256
        (q: u64, k: u64, s: u64, heads: i32, lq: i32, lk: i32, d: i32, sq: i64, sk: i64, scale: f32,
         causal: i32);
    attn_pv in "attention" [f16, bf16] block 256
        (p: u64, v: u64, o: u64, heads: i32, lq: i32, lk: i32, d: i32, sv: i64, so: i64);
    /// One block per row; `block` threads (a warp for short rows).
    softmax_rows_f32 in "attention" block dyn (s: u64, cols: i32);
    softmax_rows_to in "attention" [f16, bf16] block dyn (s: u64, p: u64, cols: i32);
    // kernels/flash_tc.cu
    /// Tensor-core flash attention: 64 query rows a block, four warps.
    flash_tc in "flash_tc" [f16, bf16] dims smem flash_tc_smem block 128
        (q: u64, k: u64, v: u64, o: u64, heads: i32, lq: i32, lk: i32, sq: i64, sk: i64, sv: i64,
         so: i64, scale: f32, causal: i32);
    // kernels/gemm_geglu.cu
    /// 128×64 output tiles.
    gemm_geglu in "gemm_geglu" [f16, bf16] block 256
        (x: u64, w: u64, bias: u64, o: u64, m: i32, n: i32, k: i32);
    // kernels/norm.cu
    group_norm in "norm" [f16, bf16] block 512
        (x: u64, gamma: u64, beta: u64, y: u64, hw: i32, c: i32, groups: i32, eps: f32, silu: i32);
    layer_norm in "norm" [f16, bf16] block 256
        (x: u64, gamma: u64, beta: u64, y: u64, c: i32, eps: f32);
    // kernels/norm_fast.cu
    group_norm_stats in "norm_fast" [f16, bf16] block 256
        (x: u64, partial: u64, hw: i32, c: i32, groups: i32, splits: i32);
    group_norm_apply in "norm_fast" [f16, bf16] block 256
        (x: u64, partial: u64, gamma: u64, beta: u64, y: u64, hw: i32, c: i32, groups: i32,
         splits: i32, eps: f32, silu: i32);
    /// One warp per row, 8 rows a block.
    layer_norm_warp in "norm_fast" [f16, bf16] block 256
        (x: u64, gamma: u64, beta: u64, y: u64, rows: i32, c: i32, eps: f32);
    // kernels/sam.cu
    rel_pos_bias in "sam" [f16, bf16] block 256
        (q: u64, rh: u64, rw: u64, s: u64, heads: i32, gh: i32, gw: i32, d: i32);
    // kernels/elementwise.cu: grid-stride loops, 256 threads a block.
    act in "elementwise" [f16, bf16, f32] block 256
        (x: u64, y: u64, n: i64, kind: i32, a: f32, b: f32);
    glu in "elementwise" [f16, bf16, f32] block 256 (x: u64, y: u64, rows: i64, c: i32, kind: i32);
    add_scaled in "elementwise" [f16, bf16, f32] block 256 (a: u64, b: u64, y: u64, n: i64, s: f32);
    add_broadcast in "elementwise" [f16, bf16, f32] block 256
        (x: u64, v: u64, y: u64, total: i64, per: i64, c: i32, v_rows: i32);
    conv_epilogue in "elementwise" [f16, bf16, f32] block 256
        (y: u64, bias: u64, ps: u64, r: u64, total: i64, per: i64, c: i32);
    place_channels in "elementwise" [f16, bf16, f32] block 256
        (src: u64, cs: i32, dst: u64, cd: i32, off: i32, rows: i64);
    slice_channels in "elementwise" [f16, bf16, f32] block 256
        (src: u64, cs: i32, dst: u64, cd: i32, off: i32, rows: i64);
    upsample_nearest in "elementwise" [f16, bf16, f32] block 256
        (x: u64, y: u64, n: i32, h: i32, w: i32, c: i32, oh: i32, ow: i32);
    depth_to_space in "elementwise" [f16, bf16, f32] block 256
        (x: u64, y: u64, n: i32, h: i32, w: i32, c: i32, k: i32);
    resize_bilinear in "elementwise" [f16, bf16, f32] block 256
        (x: u64, y: u64, n: i32, h: i32, w: i32, c: i32, oh: i32, ow: i32, align: i32);
    film in "elementwise" [f16, bf16, f32] block 256
        (x: u64, m: u64, a: u64, y: u64, total: i64, per: i64, c: i32);
    im2col in "elementwise" [f16, bf16, f32] block 256
        (x: u64, cols: u64, n: i32, h: i32, w: i32, c: i32, k: i32, stride: i32, pt: i32, pl: i32,
         ho: i32, wo: i32);
    timestep_embedding in "elementwise" [f16, bf16, f32] block 256
        (t: u64, y: u64, b: i32, dim: i32, flip: i32, shift: f32);
    gather_rows in "elementwise" [f16, bf16, f32] block 256
        (table: u64, ids: u64, y: u64, rows: i64, d: i32);
    lincomb in "elementwise" [f16, bf16, f32] block 256
        (t0: u64, c0: f32, t1: u64, c1: f32, t2: u64, c2: f32, t3: u64, c3: f32, out: u64, n: i64);
    cfg_combine in "elementwise" [f16, bf16, f32] block 256 (p: u64, o: u64, half: i64, g: f32);
    mask_mix in "elementwise" [f16, bf16, f32] block 256
        (a: u64, b: u64, m: u64, o: u64, px: i64, c: i32);
    gauss_sample in "elementwise" [f16, bf16, f32] block 256
        (m: u64, lv: u64, nz: u64, o: u64, n: i64, s: f32);
    affine_clamp in "elementwise" [f16, bf16, f32] block 256
        (x: u64, y: u64, n: i64, a: f32, b: f32, lo: f32, hi: f32);
    cast_f32_f16 in "elementwise" block 256 (x: u64, y: u64, n: i64);
    cast_f32_bf16 in "elementwise" block 256 (x: u64, y: u64, n: i64);
    cast_f16_f32 in "elementwise" block 256 (x: u64, y: u64, n: i64);
    cast_bf16_f32 in "elementwise" block 256 (x: u64, y: u64, n: i64);
    cast_f16_bf16 in "elementwise" block 256 (x: u64, y: u64, n: i64);
    cast_bf16_f16 in "elementwise" block 256 (x: u64, y: u64, n: i64);
}
