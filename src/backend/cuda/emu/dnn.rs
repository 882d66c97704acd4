//! cuDNN's forward convolution on the CPU, with the documented semantics the backend relies on:
//! NHWC x and y, filters in the "NHWC" filter format (KRSC: k, r, s, c / groups), cross-correlation,
//! symmetric padding, stride, dilation and groups; y's descriptor must equal cuDNN's output size
//! (h + 2·pad − dilation·(r − 1) − 1) / stride + 1 or the call is refused (BAD_PARAM); alpha 1,
//! beta 0; fp32 accumulation, one rounding to the storage type. The software device offers two
//! algorithms with different workspace sizes, and writes over the whole workspace it was promised,
//! so a workspace sized wrong (bytes vs elements) is an error here too.

use super::memory::{put, read, Memory};
use crate::backend::cuda::conv::ConvDesc;
use crate::backend::cuda::driver::ConvPlan;

/// IMPLICIT_GEMM (no workspace) and IMPLICIT_PRECOMP_GEMM (an index table), cuDNN's numbering.
pub const ALGOS: [i32; 2] = [0, 1];

/// The workspace an algorithm needs for `d`, in bytes.
pub fn workspace(d: &ConvDesc, algo: i32) -> usize {
    match algo {
        0 => 0,
        _ => 4 * d.r * d.s * (d.c / d.groups) + 4 * d.k,
    }
}

/// The plan cuDNN's heuristic would give, or None where it refuses (what cuDNN refuses:
/// non-16-bit storage, groups not dividing the channels, y's descriptor not the output size, an
/// operand past `call_elems` elements: the descriptors' dimensions and strides are 32-bit ints).
pub fn plan(d: &ConvDesc, call_elems: usize) -> Option<ConvPlan> {
    check(d, call_elems).ok()?;
    Some(ConvPlan {
        algo: 1,
        ws_bytes: workspace(d, 1),
    })
}

fn out_size(len: usize, pad: usize, k: usize, stride: usize, dil: usize) -> Option<usize> {
    let span = dil * (k - 1) + 1;
    (len + 2 * pad).checked_sub(span).map(|v| v / stride + 1)
}

fn check(d: &ConvDesc, call_elems: usize) -> Result<(), String> {
    use crate::backend::cuda::DType;
    if !matches!(d.dtype, DType::F16 | DType::BF16) {
        return Err(format!(
            "cuDNN: CUDNN_STATUS_NOT_SUPPORTED ({:?} data)",
            d.dtype
        ));
    }
    let zero = [d.n, d.h, d.w, d.c, d.k, d.r, d.s, d.stride.0, d.stride.1].contains(&0)
        || d.dilation.0 == 0
        || d.dilation.1 == 0
        || d.groups == 0;
    if zero || !d.c.is_multiple_of(d.groups) || !d.k.is_multiple_of(d.groups) {
        return Err(format!("cuDNN: CUDNN_STATUS_BAD_PARAM (descriptor {d:?})"));
    }
    let largest = (d.n * d.h * d.w * d.c).max(d.n * d.ho * d.wo * d.k);
    if largest > call_elems {
        return Err(format!(
            "cuDNN: CUDNN_STATUS_BAD_PARAM ({largest} elements in one tensor, past {call_elems})"
        ));
    }
    let want = (
        out_size(d.h, d.pad.0, d.r, d.stride.0, d.dilation.0),
        out_size(d.w, d.pad.1, d.s, d.stride.1, d.dilation.1),
    );
    if want != (Some(d.ho), Some(d.wo)) {
        return Err(format!(
            "cuDNN: CUDNN_STATUS_BAD_PARAM (output descriptor {}×{}, the convolution gives {want:?})",
            d.ho, d.wo
        ));
    }
    Ok(())
}

/// y = conv(x, w) with `plan`'s algorithm; every buffer's extent is checked against live memory.
pub fn run(
    mem: &Memory,
    d: &ConvDesc,
    plan: ConvPlan,
    (x, w, y, ws): (u64, u64, u64, u64),
    call_elems: usize,
) -> Result<(), String> {
    check(d, call_elems)?;
    if !ALGOS.contains(&plan.algo) || plan.ws_bytes < workspace(d, plan.algo) {
        return Err(format!(
            "cuDNN: CUDNN_STATUS_BAD_PARAM (algorithm {} with {} B of workspace; it needs {} B)",
            plan.algo,
            plan.ws_bytes,
            workspace(d, plan.algo)
        ));
    }
    let cg = d.c / d.groups;
    let kg = d.k / d.groups;
    let es = d.dtype.size();
    let (xn, wn, yn) = (
        d.n * d.h * d.w * d.c,
        d.k * d.r * d.s * cg,
        d.n * d.ho * d.wo * d.k,
    );
    mem.check("convolution input x", x, xn * es)?;
    mem.check("convolution filter", w, wn * es)?;
    mem.check("convolution output y", y, yn * es)?;
    let need = workspace(d, plan.algo);
    if need > 0 {
        mem.check("convolution workspace", ws, need)?;
        // Safety: checked above.
        unsafe { std::ptr::write_bytes(ws as *mut u8, 0xAB, need) };
    }
    // Safety: extents checked above.
    let (xv, wv) = unsafe { (read(x, d.dtype, xn), read(w, d.dtype, wn)) };
    let mut acc = vec![0f32; d.ho * d.wo * d.k];
    for b in 0..d.n {
        acc.iter_mut().for_each(|v| *v = 0.0);
        for oy in 0..d.ho {
            for ox in 0..d.wo {
                let o = &mut acc[(oy * d.wo + ox) * d.k..][..d.k];
                for ky in 0..d.r {
                    let iy = (oy * d.stride.0 + ky * d.dilation.0) as isize - d.pad.0 as isize;
                    if iy < 0 || iy >= d.h as isize {
                        continue;
                    }
                    for kx in 0..d.s {
                        let ix = (ox * d.stride.1 + kx * d.dilation.1) as isize - d.pad.1 as isize;
                        if ix < 0 || ix >= d.w as isize {
                            continue;
                        }
                        let px = &xv[((b * d.h + iy as usize) * d.w + ix as usize) * d.c..][..d.c];
                        for (kk, ov) in o.iter_mut().enumerate() {
                            let g = kk / kg;
                            let f = &wv[((kk * d.r + ky) * d.s + kx) * cg..][..cg];
                            let xs = &px[g * cg..][..cg];
                            *ov += f.iter().zip(xs).map(|(a, b)| a * b).sum::<f32>();
                        }
                    }
                }
            }
        }
        let base = b * d.ho * d.wo * d.k;
        for (i, v) in acc.iter().enumerate() {
            // Safety: inside y's checked extent.
            unsafe { put(y, d.dtype, base + i, *v) };
        }
    }
    Ok(())
}
