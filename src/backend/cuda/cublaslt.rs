//! cuBLASLt GEMMs planned once per `gemm::Shape` (UNTESTED ON A GPU): the matmul descriptor, the
//! four layouts and the heuristic's algorithm are built on a shape's first call and reused, so a
//! steady-state call is one `cublasLtMatmul` (cudarc's `Matmul` rebuilds them every call).

use super::driver::Timer;
use super::gemm::{Operands, Shape};
use super::DType;
use cudarc::cublaslt::{result as lt, sys};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // Safety: created by `Plan::new`, used only under the planner's lock, destroyed once.
        unsafe {
            for l in self.layouts {
                let _ = lt::destroy_matrix_layout(l);
            }
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

fn cuda_type(d: DType) -> sys::cudaDataType {
    match d {
        DType::F16 => sys::cudaDataType_t::CUDA_R_16F,
        DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
        DType::F32 => sys::cudaDataType_t::CUDA_R_32F,
        DType::I32 => sys::cudaDataType_t::CUDA_R_32I,
    }
}

fn check(r: Result<(), lt::CublasError>, what: &str) -> Result<(), String> {
    r.map_err(|e| format!("cuBLASLt {what}: {e:?}"))
}

impl Plan {
    /// Safety: `handle` is a live cuBLASLt handle.
    unsafe fn new(
        handle: sys::cublasLtHandle_t,
        s: &Shape,
        workspace: usize,
    ) -> Result<Plan, String> {
        use sys::cublasLtMatmulDescAttributes_t as D;
        use sys::cublasLtMatrixLayoutAttribute_t as L;
        let compute = if s.dtype == DType::F32 {
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
        } else {
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
        };
        let desc = lt::create_matmul_desc(compute, sys::cudaDataType_t::CUDA_R_32F)
            .map_err(|e| format!("cuBLASLt descriptor: {e:?}"))?;
        let mut plan = Plan {
            desc,
            layouts: [std::ptr::null_mut(); 3],
            algo: std::mem::zeroed(),
        };
        let set = |attr: D, v: *const c_void, n: usize| {
            check(
                lt::set_matmul_desc_attribute(desc, attr, v, n),
                "descriptor attribute",
            )
        };
        let (ta, tb) = (s.transa as i32, s.transb as i32);
        set(
            D::CUBLASLT_MATMUL_DESC_TRANSA,
            (&ta as *const i32).cast(),
            4,
        )?;
        set(
            D::CUBLASLT_MATMUL_DESC_TRANSB,
            (&tb as *const i32).cast(),
            4,
        )?;
        if s.bias {
            let e = sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS;
            set(
                D::CUBLASLT_MATMUL_DESC_EPILOGUE,
                (&e as *const sys::cublasLtEpilogue_t).cast(),
                std::mem::size_of_val(&e),
            )?;
        }
        let (ar, ac) = s.stored_a();
        let (br, bc) = s.stored_b();
        let out = s.out_dtype();
        let dims = [
            (cuda_type(s.dtype), ar, ac, s.lda),
            (cuda_type(s.dtype), br, bc, s.ldb),
            (cuda_type(out), s.m, s.n, s.ldc),
        ];
        for (i, (t, r, c, ld)) in dims.into_iter().enumerate() {
            plan.layouts[i] = lt::create_matrix_layout(t, r, c, ld)
                .map_err(|e| format!("cuBLASLt layout: {e:?}"))?;
            if let Some((count, sa, sb, sc)) = s.batch {
                let stride = [sa, sb, sc][i];
                let l = plan.layouts[i];
                check(
                    lt::set_matrix_layout_attribute(
                        l,
                        L::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                        (&count as *const i32).cast(),
                        4,
                    ),
                    "batch count",
                )?;
                check(
                    lt::set_matrix_layout_attribute(
                        l,
                        L::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                        (&stride as *const i64).cast(),
                        8,
                    ),
                    "batch stride",
                )?;
            }
        }
        let pref = lt::create_matmul_pref().map_err(|e| format!("cuBLASLt preference: {e:?}"))?;
        let r = check(
            lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&workspace as *const usize).cast(),
                std::mem::size_of::<usize>(),
            ),
            "workspace preference",
        )
        .and_then(|_| {
            let [a, b, c] = plan.layouts;
            lt::get_matmul_algo_heuristic(handle, desc, a, b, c, c, pref)
                .map_err(|e| format!("cuBLASLt has no algorithm for {s:?}: {e:?}"))
        });
        let _ = lt::destroy_matmul_pref(pref);
        plan.algo = r?.algo;
        Ok(plan)
    }
}

/// Candidate algorithms asked of the heuristic when autotuning.
const CANDIDATES: usize = 8;

/// Plans by shape. Raw cuBLASLt objects are only touched under the lock, on the Gpu's one stream.
#[derive(Default)]
pub struct Planner {
    plans: Mutex<HashMap<Shape, Plan>>,
}

// Safety: see `Planner`; the raw descriptors are plain host objects with no thread affinity.
unsafe impl Send for Planner {}
unsafe impl Sync for Planner {}

impl Planner {
    /// Shapes planned so far.
    pub fn planned(&self) -> usize {
        self.plans.lock().unwrap().len()
    }

    /// Queues D = alpha·op(A)·op(B) (+ bias) (+ C) on `stream`.
    ///
    /// # Safety
    /// `handle` is live; the operands hold the extents `s` describes; `workspace` is a
    /// device buffer of `ws_bytes` bytes that stays allocated while the stream uses it.
    pub unsafe fn run(
        &self,
        handle: sys::cublasLtHandle_t,
        stream: sys::cudaStream_t,
        s: &Shape,
        o: &Operands,
        (workspace, ws_bytes): (u64, usize),
        tune: Option<&Timer>,
    ) -> Result<(), String> {
        let mut plans = self.plans.lock().unwrap();
        if !plans.contains_key(s) {
            let mut p = Plan::new(handle, s, ws_bytes)?;
            if let Some(time) = tune {
                p.tune(handle, stream, s, o, (workspace, ws_bytes), time);
            }
            plans.insert(*s, p);
        }
        let p = &plans[s];
        p.launch(handle, stream, s, o, (workspace, ws_bytes), &p.algo)
    }
}

impl Plan {
    /// Replaces the heuristic's first choice by the fastest of its first `CANDIDATES`, timed on
    /// this call's own operands (D is only written, so the extra runs change nothing).
    ///
    /// Safety: as `Planner::run`.
    unsafe fn tune(
        &mut self,
        handle: sys::cublasLtHandle_t,
        stream: sys::cudaStream_t,
        s: &Shape,
        o: &Operands,
        ws: (u64, usize),
        time: &Timer,
    ) {
        let pref = match lt::create_matmul_pref() {
            Ok(p) => p,
            Err(_) => return,
        };
        let mut results: [sys::cublasLtMatmulHeuristicResult_t; CANDIDATES] = std::mem::zeroed();
        let mut found = 0;
        let [a, b, c] = self.layouts;
        let ok = lt::set_matmul_pref_attribute(
            pref,
            sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            (&ws.1 as *const usize).cast(),
            std::mem::size_of::<usize>(),
        )
        .is_ok()
            && sys::cublasLtMatmulAlgoGetHeuristic(
                handle,
                self.desc,
                a,
                b,
                c,
                c,
                pref,
                CANDIDATES as i32,
                results.as_mut_ptr(),
                &mut found,
            ) == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS;
        let _ = lt::destroy_matmul_pref(pref);
        if !ok {
            return;
        }
        let mut best: Option<(f32, sys::cublasLtMatmulAlgo_t)> = None;
        for r in &results[..(found.max(0) as usize).min(CANDIDATES)] {
            if r.state != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                continue;
            }
            let algo = r.algo;
            let t = time(&mut || self.launch(handle, stream, s, o, ws, &algo).is_ok());
            if let Some(t) = t {
                if best.is_none_or(|(b, _)| t < b) {
                    best = Some((t, algo));
                }
            }
        }
        if let Some((_, algo)) = best {
            self.algo = algo;
        }
    }

    /// Safety: as `Planner::run`.
    unsafe fn launch(
        &self,
        handle: sys::cublasLtHandle_t,
        stream: sys::cudaStream_t,
        s: &Shape,
        o: &Operands,
        (workspace, ws_bytes): (u64, usize),
        algo: &sys::cublasLtMatmulAlgo_t,
    ) -> Result<(), String> {
        if let Some(b) = o.bias {
            check(
                lt::set_matmul_desc_attribute(
                    self.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    (&b as *const u64).cast(),
                    8,
                ),
                "bias pointer",
            )?;
        }
        let beta: f32 = if o.c.is_some() { 1.0 } else { 0.0 };
        let [la, lb, lc] = self.layouts;
        lt::matmul(
            handle,
            self.desc,
            (&o.alpha as *const f32).cast(),
            (&beta as *const f32).cast(),
            o.a as *const c_void,
            la,
            o.b as *const c_void,
            lb,
            o.c.unwrap_or(o.d) as *const c_void,
            lc,
            o.d as *mut c_void,
            lc,
            algo,
            workspace as *mut c_void,
            ws_bytes,
            stream,
        )
        // Formatted only on failure: this runs for every GEMM.
        .map_err(|e| format!("cuBLASLt matmul {}×{}×{}: {e:?}", s.m, s.n, s.k))
    }
}
