//! Convolutions: cuDNN (through `cuda::conv`) with one epilogue pass, or im2col + cuBLASLt.

use super::*;

pub fn conv2d(x: &Tensor, c: &Conv2dW) -> Tensor {
    conv2d_fused(x, c, None, None)
}

/// conv(x) + bias + per_sample[n, c] + residual with the extra terms in the output pass: cuBLASLt's
/// epilogue on the GEMM paths, one `conv_epilogue` pass after cuDNN (instead of one per term).
pub fn conv2d_fused(
    x: &Tensor,
    c: &Conv2dW,
    per_sample: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Tensor {
    if dev(x).gpu().reference() && (per_sample.is_some() || residual.is_some()) {
        // One op per term, so a device run can bisect the fused epilogue.
        let mut y = conv2d_fused(x, c, None, None);
        if let Some(p) = per_sample {
            y = add_per_sample_channels(&y, p);
        }
        return match residual {
            Some(r) => add_scaled(&y, r, 1.0),
            None => y,
        };
    }
    let [pt, pb, pl, pr] = c.pad;
    let library =
        c.kernel > 1 && c.krsc && pt == pb && pl == pr && dev(x).gpu().driver().has_conv();
    conv_path(x, c, per_sample, residual, library)
}

/// Samples per call of a convolution: cuDNN descriptors and our kernels index with 32 bits, so a
/// batch past 2^31 elements in any operand (SDXL's VAE decode at 1024², batch 8) runs as smaller
/// batches. The im2col buffer counts only on the im2col path: through the library the SD VAE
/// decode at 512², batch 8, is one call per convolution.
pub fn conv_batch_chunks(
    n: usize,
    (h, w, cin): (usize, usize, usize),
    (ho, wo, cout): (usize, usize, usize),
    k: usize,
    library: bool,
    call_elems: usize,
) -> Vec<(usize, usize)> {
    let im2col = if k > 1 && !library {
        ho * wo * k * k * cin
    } else {
        0
    };
    crate::backend::batch_chunks(n, (h * w * cin).max(ho * wo * cout).max(im2col), call_elems)
}

/// `conv2d_fused` through the library (cuDNN, when `library`) or im2col + GEMM.
pub(super) fn conv_path(
    x: &Tensor,
    c: &Conv2dW,
    per_sample: Option<&Tensor>,
    residual: Option<&Tensor>,
    library: bool,
) -> Tensor {
    let (n, h, w, cin) = x.dims4();
    let k = c.kernel;
    let [pt, pb, pl, pr] = c.pad;
    let ho = (h + pt + pb - k) / c.stride + 1;
    let wo = (w + pl + pr - k) / c.stride + 1;
    let cout = c.out_channels();
    let limit = dev(x).gpu().limits().call_elems;
    let chunks = conv_batch_chunks(n, (h, w, cin), (ho, wo, cout), k, library, limit);
    if chunks.len() > 1 {
        let parts: Vec<Tensor> = chunks
            .iter()
            .map(|&(start, len)| {
                conv_path(
                    &x.narrow0(start, len),
                    c,
                    per_sample.map(|p| p.narrow0(start, len)).as_ref(),
                    residual.map(|r| r.narrow0(start, len)).as_ref(),
                    library,
                )
            })
            .collect();
        return Tensor::cat0(&parts.iter().collect::<Vec<_>>());
    }
    let xd = dev(x);
    let g = xd.gpu();
    let (t, o) = out(xd, vec![n, ho, wo, cout]);
    // After a recorded failure (an out-of-memory allocation) the buffers are null: launching
    // cuDNN on them would turn a recoverable error into an illegal address that poisons the
    // context. The failure is reported by the next `check`.
    if g.failed() {
        return t;
    }
    let ptr = |t: Option<&Tensor>| t.map_or(0, |t| dev(t).ptr());
    if library {
        if crate::backend::cuda::conv::conv(x, c, &o) {
            let bias = c.bias.as_ref();
            if bias.is_some() || per_sample.is_some() || residual.is_some() {
                kernels::conv_epilogue(
                    g,
                    o.dtype,
                    grid(o.len),
                    o.ptr(),
                    ptr(bias),
                    ptr(per_sample),
                    ptr(residual),
                    o.len as i64,
                    (ho * wo * cout) as i64,
                    cout as i32,
                );
            }
            return t;
        }
        // The library refused this shape: im2col, in batches its buffer allows.
        if conv_batch_chunks(n, (h, w, cin), (ho, wo, cout), k, false, limit).len() > 1 {
            return conv_path(x, c, per_sample, residual, false);
        }
    }
    conv_gemm(x, c, per_sample, residual, (t, o))
}

/// The GEMM path into `out` = (tensor, its buffer): 1×1 convolutions are plain GEMMs; asymmetric
/// padding (the VAE's downsampler) and machines without cuDNN go through im2col.
fn conv_gemm(
    x: &Tensor,
    c: &Conv2dW,
    per_sample: Option<&Tensor>,
    residual: Option<&Tensor>,
    (t, o): (Tensor, DevBuf),
) -> Tensor {
    let (n, h, w, cin) = x.dims4();
    let (_, ho, wo, cout) = t.dims4();
    let (k, [pt, _, pl, _]) = (c.kernel, c.pad);
    let xd = dev(x);
    let g = xd.gpu();
    let rows = n * ho * wo;
    let kk = k * k * cin;
    let direct = k == 1 && c.stride == 1 && c.pad == [0; 4];
    let cols = if direct {
        xd.clone()
    } else {
        // conv_path's batch chunks keep this buffer (9× the input for 3×3) within one call's
        // elements (4 GiB in fp16 on a GPU) down to single samples; past it with more than one
        // sample, the chunking is wrong.
        let limit = g.limits().call_elems;
        if rows * kk > limit && n > 1 {
            g.fail(format!(
                "im2col: a {}-element buffer for one call, past the limit of {limit}",
                rows * kk
            ));
            return t;
        }
        let cols = g.alloc(rows * kk, xd.dtype);
        kernels::im2col(
            g,
            xd.dtype,
            grid(rows * kk),
            xd.ptr(),
            cols.ptr(),
            n as i32,
            h as i32,
            w as i32,
            cin as i32,
            k as i32,
            c.stride as i32,
            pt as i32,
            pl as i32,
            ho as i32,
            wo as i32,
        );
        cols
    };
    // KRSC weights are [cout, kh·kw·cin]: the transposed GEMM operand, like a linear layer's.
    gemm(
        &cols,
        rows,
        kk,
        dev(&c.weight),
        cout,
        c.krsc,
        c.bias.as_ref().map(dev),
        residual.map(dev),
        &o,
    );
    match per_sample {
        // Only without cuDNN (or for 1×1 convolutions, which no model conditions on time).
        Some(p) => add_per_sample_channels(&t, p),
        None => t,
    }
}

#[cfg(test)]
mod tests {
    /// Issue 23 defect: the path is chosen before the batch is split. The SD VAE decoder's widest
    /// 3×3 convolutions at 512², batch 8 (256 → 256 and 512 → 256 channels) are one call through
    /// cuDNN; only im2col's 9×-wider buffer needs 2–3 calls.
    const GPU: usize = crate::backend::cuda::Limits::GPU.call_elems;

    #[test]
    fn library_convolutions_are_not_split_for_an_unused_im2col_buffer() {
        for cin in [256, 512] {
            let shape = ((512, 512, cin), (512, 512, 256));
            assert_eq!(
                super::conv_batch_chunks(8, shape.0, shape.1, 3, true, GPU),
                [(0, 8)]
            );
            let im2col = super::conv_batch_chunks(8, shape.0, shape.1, 3, false, GPU);
            assert!((2..=8).contains(&im2col.len()), "{im2col:?}");
            assert_eq!(im2col.iter().map(|c| c.1).sum::<usize>(), 8);
        }
        // SDXL's VAE at 1024²: the activations alone pass 2^31 elements at batch 8.
        let big = super::conv_batch_chunks(8, (1024, 1024, 512), (1024, 1024, 512), 3, true, GPU);
        assert!(big.len() > 1, "{big:?}");
    }
}
