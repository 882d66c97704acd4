//! Attention: tensor-core flash kernels for the common head dims, GEMMs around a row softmax for
//! any other, and SAM's relative-position variant.

use super::*;

/// Scaled dot-product attention. Head dims 40/64/80/128/160: the tensor-core flash kernel
/// (kernels/flash_tc.cu); other widths (the VAE's single 512-wide head, small test models):
/// cuBLASLt GEMMs around a row softmax, scores materialised per sample. `TOFFEE_KERNELS=reference`
/// runs the simple CUDA-core kernels instead (kernels/attention.cu).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool) -> Tensor {
    let (b, lq, hd) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    let lk = k.shape()[1];
    let d = hd / heads;
    let qd = dev(q);
    let g = qd.gpu();
    // grid.y is one (sample, head) each on every path.
    let sliced = by_grid_y(g, b, heads, |s, n| {
        let part = |t: &Tensor| t.narrow0(s, n);
        attention(&part(q), &part(k), &part(v), heads, causal)
    });
    if let Some(t) = sliced {
        return t;
    }
    let (t, o) = out(qd, vec![b, lq, hd]);
    let flash = kernels::FLASH_DIMS.contains(&d);
    if !flash {
        if g.reference() || causal {
            attention_any(q, k, v, heads, causal, &o, |_| {});
        } else {
            attention_gemm(q, k, v, heads, &o);
        }
        return t;
    }
    // cp.async moves 16-byte chunks: every row start must be 16-byte aligned.
    let aligned = [qd.ptr(), dev(k).ptr(), dev(v).ptr(), o.ptr()]
        .iter()
        .all(|p| p % 16 == 0)
        && hd.is_multiple_of(8);
    let tensor_cores = !g.reference() && aligned;
    let (kernel, rows_per_block) = if tensor_cores {
        (kernels::flash_tc as kernels::Flash, 64)
    } else {
        (kernels::flash_attention as kernels::Flash, 16)
    };
    let hd = hd as i64;
    kernel(
        g,
        qd.dtype,
        d,
        (lq.div_ceil(rows_per_block) as u32, (b * heads) as u32),
        qd.ptr(),
        dev(k).ptr(),
        dev(v).ptr(),
        o.ptr(),
        heads as i32,
        lq as i32,
        lk as i32,
        hd,
        hd,
        hd,
        hd,
        1.0 / (d as f32).sqrt(),
        causal as i32,
    );
    t
}

/// Non-causal attention for any head width as GEMMs, one sample at a time, heads as a strided
/// batch: S = scale·Q·Kᵀ in f32, P = softmax(S) in the storage type, O = P·V. For wide heads (the
/// VAE's 512) this runs on tensor cores where a flash kernel would need 512 accumulators a row.
pub(super) fn attention_gemm(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, o: &DevBuf) {
    let (b, lq, hd) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    let lk = k.shape()[1];
    let d = hd / heads;
    let qd = dev(q);
    let g = qd.gpu();
    let es = qd.dtype.size() as u64;
    let (hh, lqq, lkk, dd, hdd) = (heads as i64, lq as i64, lk as i64, d as i64, hd as i64);
    let s = g.alloc(heads * lq * lk, DType::F32);
    let p = g.alloc(heads * lq * lk, qd.dtype);
    for i in 0..b as u64 {
        let (qo, ko) = (i * (lq * hd) as u64 * es, i * (lk * hd) as u64 * es);
        // Column-major: S_hᵀ[lk×lq] = K_h·Q_hᵀ, with K_h and Q_h read through ld = H·D.
        g.gemm(
            &gemm::Shape {
                dtype: qd.dtype,
                out_f32: true,
                transa: true,
                transb: false,
                m: lk as u64,
                n: lq as u64,
                k: d as u64,
                lda: hdd,
                ldb: hdd,
                ldc: lkk,
                batch: Some((hh as i32, dd, dd, lqq * lkk)),
                bias: false,
            },
            &gemm::Operands {
                a: dev(k).ptr() + ko,
                b: qd.ptr() + qo,
                c: None,
                d: s.ptr(),
                bias: None,
                alpha: 1.0 / (d as f32).sqrt(),
            },
        );
        kernels::softmax_rows_to(
            g,
            qd.dtype,
            ((heads * lq) as u32, 1),
            softmax_block(lk),
            s.ptr(),
            p.ptr(),
            lk as i32,
        );
        // O_hᵀ[d×lq] = V_hᵀ·P_hᵀ, written through ld = H·D into the packed output.
        g.gemm(
            &gemm::Shape {
                dtype: qd.dtype,
                out_f32: false,
                transa: false,
                transb: false,
                m: d as u64,
                n: lq as u64,
                k: lk as u64,
                lda: hdd,
                ldb: lkk,
                ldc: hdd,
                batch: Some((hh as i32, dd, lqq * lkk, dd)),
                bias: false,
            },
            &gemm::Operands {
                a: dev(v).ptr() + ko,
                b: p.ptr(),
                c: None,
                d: o.ptr() + qo,
                bias: None,
                alpha: 1.0,
            },
        );
    }
}

/// Threads for one softmax row of `cols` scores: a warp for short rows (text attention's 77 keys
/// need no 256 threads, most of which would only join the reductions), up to 256 for long ones.
pub(super) fn softmax_block(cols: usize) -> u32 {
    cols.next_power_of_two().clamp(32, 256) as u32
}

/// Attention for head dims without a flash kernel (the VAE's one 512-wide head, test models):
/// fp32 scores in memory, `add_bias` on them (SAM's relative positions), row softmax, then P·V.
pub(super) fn attention_any(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    causal: bool,
    o: &DevBuf,
    add_bias: impl FnOnce(&DevBuf),
) {
    let (b, lq, hd) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    let lk = k.shape()[1];
    let d = hd / heads;
    let qd = dev(q);
    let g = qd.gpu();
    let bh = b * heads;
    let s = g.alloc(bh * lq * lk, DType::F32);
    let ld = hd as i64;
    kernels::attn_scores(
        g,
        qd.dtype,
        ((lq * lk).div_ceil(256).clamp(1, 65535) as u32, bh as u32),
        qd.ptr(),
        dev(k).ptr(),
        s.ptr(),
        heads as i32,
        lq as i32,
        lk as i32,
        d as i32,
        ld,
        ld,
        1.0 / (d as f32).sqrt(),
        causal as i32,
    );
    add_bias(&s);
    kernels::softmax_rows_f32(
        g,
        ((bh * lq) as u32, 1),
        softmax_block(lk),
        s.ptr(),
        lk as i32,
    );
    kernels::attn_pv(
        g,
        qd.dtype,
        ((lq * d).div_ceil(256).clamp(1, 65535) as u32, bh as u32),
        s.ptr(),
        dev(v).ptr(),
        o.ptr(),
        heads as i32,
        lq as i32,
        lk as i32,
        d as i32,
        ld,
        ld,
    );
}

/// SAM's decomposed relative-position attention (see backend::rel_pos_attention): the generic
/// materialised-scores path with the relative terms added to the f32 scores (kernels/sam.cu).
pub fn rel_pos_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    grid: (usize, usize),
    rel_h: &Tensor,
    rel_w: &Tensor,
) -> Tensor {
    let (b, l, hd) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    let qd = dev(q);
    let g = qd.gpu();
    let sliced = by_grid_y(g, b, heads, |s, n| {
        let part = |t: &Tensor| t.narrow0(s, n);
        rel_pos_attention(&part(q), &part(k), &part(v), heads, grid, rel_h, rel_w)
    });
    if let Some(t) = sliced {
        return t;
    }
    let (t, o) = out(qd, vec![b, l, hd]);
    attention_any(q, k, v, heads, false, &o, |s| {
        kernels::rel_pos_bias(
            g,
            qd.dtype,
            (
                (l * l).div_ceil(256).clamp(1, 65535) as u32,
                (b * heads) as u32,
            ),
            qd.ptr(),
            dev(rel_h).ptr(),
            dev(rel_w).ptr(),
            s.ptr(),
            heads as i32,
            grid.0 as i32,
            grid.1 as i32,
            (hd / heads) as i32,
        );
    });
    t
}
