//! cuBLASLt's matmul on the CPU, with exactly the documented semantics the backend relies on:
//! column-major matrices, A stored k×m when transposed (else m×k) with leading dimension lda ≥ its
//! rows (B likewise), D = epilogue(alpha·op(A)·op(B) + beta·C) where beta is 1 when C is given
//! (it then shares D's layout) and the BIAS epilogue adds bias[row] (in D's type) to every column;
//! strided batches with one stride per matrix; fp32 accumulation (TF32 inputs for fp32 data, as
//! CUBLAS_COMPUTE_32F_FAST_TF32 allows); the result rounded once to D's type.

use super::memory::{get, put, Memory};
use crate::backend::cuda::gemm::{Operands, Shape};
use crate::backend::cuda::DType;

/// Rounds an f32 to TF32 (10 explicit mantissa bits), nearest-even.
fn tf32(v: f32) -> f32 {
    if !v.is_finite() {
        return v;
    }
    let b = v.to_bits();
    let r = b.wrapping_add(0xFFF + ((b >> 13) & 1)) & !0x1FFF;
    f32::from_bits(r)
}

/// Elements spanned by a column-major matrix of `rows`×`cols` with leading dimension `ld`, in a
/// batch of `count` with `stride`.
fn span(rows: u64, cols: u64, ld: i64, count: i32, stride: i64) -> usize {
    if rows == 0 || cols == 0 {
        return 0;
    }
    ((count as i64 - 1) * stride + (cols as i64 - 1) * ld + rows as i64) as usize
}

/// The checks cuBLASLt makes when the layouts are created and the matmul runs.
pub fn validate(s: &Shape) -> Result<(), String> {
    let (ar, _) = s.stored_a();
    let (br, _) = s.stored_b();
    let bad = |what: String| {
        Err(format!(
            "cuBLASLt: CUBLAS_STATUS_INVALID_VALUE ({what}) for {s:?}"
        ))
    };
    if s.m == 0 || s.n == 0 {
        return bad("an empty output".into());
    }
    if s.lda < ar as i64 || s.ldb < br as i64 || s.ldc < s.m as i64 {
        return bad(format!(
            "leading dimensions lda {} / ldb {} / ldc {} below the rows {ar} / {br} / {}",
            s.lda, s.ldb, s.ldc, s.m
        ));
    }
    if let Some((count, sa, sb, sc)) = s.batch {
        if count < 1 || sa < 0 || sb < 0 || sc < 0 {
            return bad(format!("batch of {count} with strides {sa}, {sb}, {sc}"));
        }
    }
    if s.dtype == DType::I32 {
        return bad("integer inputs".into());
    }
    if s.bias && s.out_f32 && s.dtype != DType::F32 {
        // Our plans never ask for it; cuBLASLt would want the bias type set explicitly.
        return bad("a bias epilogue with fp32 output from 16-bit inputs".into());
    }
    Ok(())
}

/// Runs the GEMM (after `validate`), checking every operand's extent against live memory.
pub fn run(mem: &Memory, s: &Shape, o: &Operands) -> Result<(), String> {
    let (count, sa, sb, sc) = s.batch.unwrap_or((1, 0, 0, 0));
    let (ar, ac) = s.stored_a();
    let (br, bc) = s.stored_b();
    let out = s.out_dtype();
    let es = |d: DType| d.size();
    mem.check(
        "GEMM operand A",
        o.a,
        span(ar, ac, s.lda, count, sa) * es(s.dtype),
    )?;
    mem.check(
        "GEMM operand B",
        o.b,
        span(br, bc, s.ldb, count, sb) * es(s.dtype),
    )?;
    let dspan = span(s.m, s.n, s.ldc, count, sc) * es(out);
    mem.check("GEMM output D", o.d, dspan)?;
    if let Some(c) = o.c {
        mem.check("GEMM input C", c, dspan)?;
    }
    match (s.bias, o.bias) {
        (true, Some(b)) => mem.check("GEMM bias", b, s.m as usize * es(out))?,
        (true, None) => return Err("cuBLASLt: a BIAS epilogue without a bias pointer".into()),
        (false, Some(_)) => {
            return Err("cuBLASLt: a bias pointer on a plan without the BIAS epilogue".into())
        }
        (false, None) => {}
    }
    let (m, n, k) = (s.m as usize, s.n as usize, s.k as usize);
    let round = |v: f32| if s.dtype == DType::F32 { tf32(v) } else { v };
    for bi in 0..count as usize {
        // op(A) as a dense row-major m×k, op(B) as a dense row-major k×n, in f32.
        let mut a = vec![0f32; m * k];
        let mut b = vec![0f32; k * n];
        let (a0, b0) = (bi as i64 * sa, bi as i64 * sb);
        // Safety (all reads and writes below): every index lies in the spans checked above.
        unsafe {
            for i in 0..m {
                for p in 0..k {
                    let (r, c) = if s.transa { (p, i) } else { (i, p) };
                    let idx = (a0 + c as i64 * s.lda + r as i64) as usize;
                    a[i * k + p] = round(get(o.a, s.dtype, idx));
                }
            }
            for p in 0..k {
                for j in 0..n {
                    let (r, c) = if s.transb { (j, p) } else { (p, j) };
                    let idx = (b0 + c as i64 * s.ldb + r as i64) as usize;
                    b[p * n + j] = round(get(o.b, s.dtype, idx));
                }
            }
        }
        let mut acc = vec![0f32; m * n];
        if k > 0 {
            // Safety: dense row-major buffers of the stated sizes.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    acc.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    a.as_ptr(),
                    1,
                    k as isize,
                    b.as_ptr(),
                    1,
                    n as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        }
        let d0 = bi as i64 * sc;
        unsafe {
            for j in 0..n {
                for i in 0..m {
                    let idx = (d0 + j as i64 * s.ldc + i as i64) as usize;
                    let mut v = o.alpha * acc[i * n + j];
                    if let Some(c) = o.c {
                        v += get(c, out, idx);
                    }
                    if let Some(bias) = o.bias {
                        v += get(bias, out, i);
                    }
                    put(o.d, out, idx, v);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tf32_keeps_ten_mantissa_bits() {
        assert_eq!(tf32(1.0), 1.0);
        // 1 + 2^-11 is a tie between 1 and 1 + 2^-10: to even (1).
        assert_eq!(tf32(1.0 + 2f32.powi(-11)), 1.0);
        assert_eq!(tf32(1.0 + 3.0 * 2f32.powi(-11)), 1.0 + 2.0 * 2f32.powi(-10));
        assert!(tf32(f32::NAN).is_nan());
    }
}
