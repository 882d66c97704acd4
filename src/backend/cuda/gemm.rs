//! A GEMM as cuBLASLt's descriptors state it. The ops build a `Shape` once per call site and both
//! devices plan from it: the CUDA driver turns it into cuBLASLt descriptors (`cublaslt`), the
//! software device computes exactly what those descriptors mean, so a wrong transpose, leading
//! dimension or batch stride gives a wrong number there too. Epilogues fold a bias and a
//! residual (`C`, with beta = 1) into the GEMM's output pass.

use super::DType;

/// cuBLASLt's column-major problem: D[m×n] = alpha·op(A)[m×k]·op(B)[k×n] (+ bias[m]) (+ C).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    /// Storage type of A and B, and of C/D unless `out_f32`.
    pub dtype: DType,
    pub out_f32: bool,
    pub transa: bool,
    pub transb: bool,
    pub m: u64,
    pub n: u64,
    pub k: u64,
    pub lda: i64,
    pub ldb: i64,
    pub ldc: i64,
    /// Strided batch: (count, stride of A, of B, of C/D), in elements.
    pub batch: Option<(i32, i64, i64, i64)>,
    pub bias: bool,
}

/// Device pointers of one call.
#[derive(Clone, Copy, Debug)]
pub struct Operands {
    pub a: u64,
    pub b: u64,
    /// Added to the product (beta = 1) when set: a residual with D's layout.
    pub c: Option<u64>,
    pub d: u64,
    pub bias: Option<u64>,
    pub alpha: f32,
}

impl Shape {
    /// A as stored (column-major rows × columns), before `transa`.
    pub fn stored_a(&self) -> (u64, u64) {
        if self.transa {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        }
    }

    /// B as stored, before `transb`.
    pub fn stored_b(&self) -> (u64, u64) {
        if self.transb {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        }
    }

    /// Storage type of C and D.
    pub fn out_dtype(&self) -> DType {
        if self.out_f32 {
            DType::F32
        } else {
            self.dtype
        }
    }
}
