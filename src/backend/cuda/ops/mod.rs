//! The backend ops on device tensors, by family (untested on a GPU; run on the software GPU in
//! CI). Shapes were checked by the dispatching layer in backend/mod.rs; here every op allocates its
//! output from the pool and queues one or a few kernels (through the typed launchers of
//! `cuda::kernels`) or library calls on the Gpu's stream.

use super::{gemm, kernels};
use super::{DType, DevBuf, Gpu};
use crate::backend::layer::{Activation, Conv2dW, LinearW};
use crate::tensor::Tensor;
use std::sync::Arc;

mod attention;
mod conv;
mod elementwise;
mod linear;
mod norm;

pub use attention::*;
pub use conv::*;
pub use elementwise::*;
pub use linear::*;
pub use norm::*;

pub(super) fn dev(t: &Tensor) -> &DevBuf {
    t.dev().expect("a device tensor")
}

pub(super) fn out(like: &DevBuf, shape: Vec<usize>) -> (Tensor, DevBuf) {
    let n = shape.iter().product();
    let b = like.gpu().alloc(n, like.dtype);
    (Tensor::from_device(shape, b.clone()), b)
}

/// A batched op run on sample slices small enough that `y_per_sample` grid.y blocks a sample stay
/// within the device's grid.y limit, outputs concatenated; None when the batch fits one launch
/// (the common case, no copies).
pub(super) fn by_grid_y(
    g: &Gpu,
    n: usize,
    y_per_sample: usize,
    f: impl Fn(usize, usize) -> Tensor,
) -> Option<Tensor> {
    let per = (g.limits().grid_yz as usize / y_per_sample.max(1)).max(1);
    if n <= per {
        return None;
    }
    let parts: Vec<Tensor> = (0..n).step_by(per).map(|s| f(s, per.min(n - s))).collect();
    Some(Tensor::cat0(&parts.iter().collect::<Vec<_>>()))
}

/// Grid for a grid-stride elementwise kernel over `n` elements.
pub(super) fn grid(n: usize) -> (u32, u32) {
    (n.div_ceil(256).clamp(1, 65535) as u32, 1)
}
