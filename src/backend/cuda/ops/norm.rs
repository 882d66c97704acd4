//! GroupNorm(+SiLU) and LayerNorm (kernels/norm_fast.cu, the reference kernels of kernels/norm.cu).

use super::*;

/// GroupNorm(+SiLU): statistics split over enough blocks to fill the chip, then one vectorised
/// apply pass (kernels/norm_fast.cu); the one-block-per-group kernel (norm.cu) for
/// `TOFFEE_KERNELS=reference`, channel counts that are not a multiple of 8 or above 2048, groups
/// of fewer than 4 channels, and more than 128 groups.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
    silu: bool,
) -> Tensor {
    let c = x.last_dim();
    let n = x.shape()[0];
    let hw = x.numel() / (n * c);
    let xd = dev(x);
    let g = xd.gpu();
    // The fast kernels' grid.y is one sample each.
    let sliced = by_grid_y(g, n, 1, |s, len| {
        group_norm(&x.narrow0(s, len), groups, gamma, beta, eps, silu)
    });
    if let Some(t) = sliced {
        return t;
    }
    let (t, o) = out(xd, x.shape().to_vec());
    if g.reference() || !c.is_multiple_of(8) || c > 2048 || c / groups < 4 || groups > 128 {
        kernels::group_norm(
            g,
            xd.dtype,
            ((n * groups) as u32, 1),
            xd.ptr(),
            dev(gamma).ptr(),
            dev(beta).ptr(),
            o.ptr(),
            hw as i32,
            c as i32,
            groups as i32,
            eps,
            silu as i32,
        );
        return t;
    }
    let splits = group_norm_splits(n, hw * c);
    let partial = g.alloc(n * groups * splits * 3, DType::F32);
    kernels::group_norm_stats(
        g,
        xd.dtype,
        (splits as u32, n as u32),
        xd.ptr(),
        partial.ptr(),
        hw as i32,
        c as i32,
        groups as i32,
        splits as i32,
    );
    kernels::group_norm_apply(
        g,
        xd.dtype,
        (hw.div_ceil(32) as u32, n as u32),
        xd.ptr(),
        partial.ptr(),
        dev(gamma).ptr(),
        dev(beta).ptr(),
        o.ptr(),
        hw as i32,
        c as i32,
        groups as i32,
        splits as i32,
        eps,
        silu as i32,
    );
    t
}

/// Blocks per sample for the statistics pass (each reads whole pixel rows, every group): one wave
/// of 4 blocks on each of 132 SMs (an H200) without splitting below 4096 values a block or past 32
/// (kernels/norm_fast.cu).
pub fn group_norm_splits(samples: usize, per_sample: usize) -> usize {
    let cap = (per_sample / 4096).clamp(1, 32);
    (528 / samples.max(1)).clamp(1, cap)
}

/// LayerNorm: one warp per row (kernels/norm_fast.cu); one block per row for
/// `TOFFEE_KERNELS=reference` and widths that are not a multiple of 8.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32) -> Tensor {
    let c = x.last_dim();
    let rows = x.numel() / c;
    let xd = dev(x);
    let g = xd.gpu();
    let (t, o) = out(xd, x.shape().to_vec());
    let (x, gamma, beta, y) = (xd.ptr(), dev(gamma).ptr(), dev(beta).ptr(), o.ptr());
    if g.reference() || !c.is_multiple_of(8) {
        let grid = (rows as u32, 1);
        kernels::layer_norm(g, xd.dtype, grid, x, gamma, beta, y, c as i32, eps);
    } else {
        let grid = (rows.div_ceil(8) as u32, 1);
        kernels::layer_norm_warp(
            g,
            xd.dtype,
            grid,
            x,
            gamma,
            beta,
            y,
            rows as i32,
            c as i32,
            eps,
        );
    }
    t
}
