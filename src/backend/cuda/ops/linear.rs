//! Linear layers as cuBLASLt GEMMs (bias and residual in the epilogue) and the fused GEMM + GEGLU
//! kernel (kernels/gemm_geglu.cu).

use super::*;

/// Row-major C[m×n] = A[m×k] · B + bias[n] (+ residual[m×n]), where B is W[n×k]
/// (`b_transposed`, a linear layer's weight) or W[k×n] (a convolution's [kh·kw·cin, cout]
/// weight). fp32 accumulation; bias and residual ride in cuBLASLt's epilogue.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm(
    a: &DevBuf,
    m: usize,
    k: usize,
    w: &DevBuf,
    n: usize,
    b_transposed: bool,
    bias: Option<&DevBuf>,
    residual: Option<&DevBuf>,
    c: &DevBuf,
) {
    let g = a.gpu();
    if g.failed() || m == 0 {
        return;
    }
    if a.dtype == DType::I32 {
        g.fail("integer GEMM");
        return;
    }
    // cuBLASLt is column-major: compute Cᵀ[n×m] = op(W)·Aᵀ.
    let shape = gemm::Shape {
        dtype: a.dtype,
        out_f32: false,
        transa: b_transposed,
        transb: false,
        m: n as u64,
        n: m as u64,
        k: k as u64,
        lda: if b_transposed { k as i64 } else { n as i64 },
        ldb: k as i64,
        ldc: n as i64,
        batch: None,
        bias: bias.is_some(),
    };
    g.gemm(
        &shape,
        &gemm::Operands {
            a: w.ptr(),
            b: a.ptr(),
            c: residual.map(|r| r.ptr()),
            d: c.ptr(),
            bias: bias.map(|b| b.ptr()),
            alpha: 1.0,
        },
    );
}

pub fn linear(x: &Tensor, l: &LinearW) -> Tensor {
    let (k, n) = (l.in_features(), l.out_features());
    let m = x.numel() / k;
    let xd = dev(x);
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = n;
    let (t, o) = out(xd, shape);
    gemm(
        xd,
        m,
        k,
        dev(&l.weight),
        n,
        true,
        l.bias.as_ref().map(dev),
        None,
        &o,
    );
    t
}

/// GEGLU(x·Wᵀ + b) in one tensor-core kernel (kernels/gemm_geglu.cu) when its preconditions hold
/// (widths multiples of 8, a bias, 16-byte aligned operands); else cuBLASLt then `glu`.
pub fn linear_geglu(x: &Tensor, l: &LinearW) -> Tensor {
    let (k, n2) = (l.in_features(), l.out_features());
    let n = n2 / 2;
    let m = x.numel() / k;
    let xd = dev(x);
    let g = xd.gpu();
    let fused = !g.reference()
        && m > 0
        && k.is_multiple_of(8)
        && n.is_multiple_of(8)
        && l.bias.is_some()
        && [xd.ptr(), dev(&l.weight).ptr()]
            .iter()
            .chain(l.bias.as_ref().map(|b| dev(b).ptr()).iter())
            .all(|p| p % 16 == 0);
    if !fused {
        return glu(&linear(x, l), Activation::Gelu);
    }
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = n;
    let (t, o) = out(xd, shape);
    let es = xd.dtype.size() as u64;
    // grid.y is one 128-row tile each and may not pass the limit: taller inputs run as row slices.
    for (r0, rows) in grid_y_slices(m, 128, g.limits().grid_yz) {
        kernels::gemm_geglu(
            g,
            xd.dtype,
            (n.div_ceil(64) as u32, rows.div_ceil(128) as u32),
            xd.ptr() + (r0 * k) as u64 * es,
            dev(&l.weight).ptr(),
            l.bias.as_ref().map_or(0, |b| dev(b).ptr()),
            o.ptr() + (r0 * n) as u64 * es,
            rows as i32,
            n as i32,
            k as i32,
        );
    }
    t
}

/// (start, len) slices of `total` rows, `per_block` rows a grid.y block, each slice within
/// `limit` grid.y blocks.
pub fn grid_y_slices(total: usize, per_block: usize, limit: u32) -> Vec<(usize, usize)> {
    let step = limit as usize * per_block.max(1);
    (0..total)
        .step_by(step)
        .map(|s| (s, step.min(total - s)))
        .collect()
}

/// x·Wᵀ + b + residual in one GEMM (the residual is cuBLASLt's C).
pub fn linear_residual(x: &Tensor, l: &LinearW, residual: &Tensor) -> Tensor {
    let (k, n) = (l.in_features(), l.out_features());
    let m = x.numel() / k;
    let xd = dev(x);
    if xd.gpu().reference() {
        return add_scaled(&linear(x, l), residual, 1.0);
    }
    let (t, o) = out(xd, residual.shape().to_vec());
    gemm(
        xd,
        m,
        k,
        dev(&l.weight),
        n,
        true,
        l.bias.as_ref().map(dev),
        Some(dev(residual)),
        &o,
    );
    t
}

#[cfg(test)]
mod tests {
    #[test]
    fn grid_y_slices_stay_within_the_limit() {
        assert_eq!(super::grid_y_slices(128, 128, 65535), [(0, 128)]);
        let rows = 65535 * 128 + 5;
        assert_eq!(
            super::grid_y_slices(rows, 128, 65535),
            [(0, 65535 * 128), (65535 * 128, 5)]
        );
        assert!(super::grid_y_slices(0, 128, 65535).is_empty());
    }
}
