//! cuDNN convolutions for the CUDA driver (UNTESTED ON A GPU; the software device runs the same
//! `ConvDesc`s through its CPU convolution): descriptors and the algorithm (the heuristic's first
//! choice, or the fastest measured with `TOFFEE_AUTOTUNE=1`) are kept per descriptor, refusals
//! too.

use super::conv::ConvDesc;
use super::driver::{ConvPlan, Timer};
use super::DType;
use cudarc::cudnn::sys::{
    cudnnConvolutionFwdAlgo_t, cudnnConvolutionMode_t, cudnnMathType_t, cudnnTensorFormat_t,
};
use cudarc::cudnn::{
    ConvDescriptor, ConvForward, Cudnn, CudnnDataType, CudnnError, FilterDescriptor,
    TensorDescriptor,
};
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

struct Descs<T> {
    x: TensorDescriptor<T>,
    w: FilterDescriptor<T>,
    y: TensorDescriptor<T>,
    conv: ConvDescriptor<f32>,
}

enum Descriptors {
    F16(Descs<half::f16>),
    BF16(Descs<half::bf16>),
}

struct Plan {
    descs: Descriptors,
    plan: ConvPlan,
}

/// cudarc's cuDNN handle and the plans. The handle holds a raw pointer; every use goes through
/// the mutex and the device's single stream, which is what makes sharing it sound.
pub struct CudnnPlans {
    cudnn: Arc<Cudnn>,
    stream: Arc<CudaStream>,
    /// None: cuDNN refused the shape (the caller falls back to im2col), asked once.
    plans: Mutex<HashMap<ConvDesc, Option<Plan>>>,
}

// Safety: see above — access is serialised by the Mutex.
unsafe impl Send for CudnnPlans {}
unsafe impl Sync for CudnnPlans {}

fn algo_of(i: i32) -> cudnnConvolutionFwdAlgo_t {
    ALGOS
        .into_iter()
        .find(|a| *a as i32 == i)
        .unwrap_or(ALGOS[0])
}

fn descs<T: CudnnDataType>(h: &Arc<Cudnn>, d: &ConvDesc) -> Result<Descs<T>, CudnnError> {
    let i = |v: usize| v as i32;
    let nhwc = cudnnTensorFormat_t::CUDNN_TENSOR_NHWC;
    let x = h.create_4d_tensor::<T>(nhwc, [i(d.n), i(d.c), i(d.h), i(d.w)])?;
    let w = h.create_4d_filter::<T>(nhwc, [i(d.k), i(d.c / d.groups), i(d.r), i(d.s)])?;
    let y = h.create_4d_tensor::<T>(nhwc, [i(d.n), i(d.k), i(d.ho), i(d.wo)])?;
    let mut conv = h.create_conv2d::<f32>(
        [i(d.pad.0), i(d.pad.1)],
        [i(d.stride.0), i(d.stride.1)],
        [i(d.dilation.0), i(d.dilation.1)],
        cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
    )?;
    conv.set_math_type(cudnnMathType_t::CUDNN_TENSOR_OP_MATH)?;
    Ok(Descs { x, w, y, conv })
}

fn op<T: CudnnDataType>(d: &Descs<T>) -> ConvForward<'_, T, f32, T> {
    ConvForward {
        conv: &d.conv,
        x: &d.x,
        w: &d.w,
        y: &d.y,
    }
}

fn plan(h: &Arc<Cudnn>, d: &ConvDesc) -> Result<Plan, CudnnError> {
    fn pick<T: CudnnDataType>(d: &Descs<T>) -> Result<ConvPlan, CudnnError> {
        let algo = op(d).pick_algorithm()?;
        Ok(ConvPlan {
            algo: algo as i32,
            ws_bytes: op(d).get_workspace_size(algo)?,
        })
    }
    Ok(match d.dtype {
        DType::F16 => {
            let ds = descs::<half::f16>(h, d)?;
            let plan = pick(&ds)?;
            Plan {
                descs: Descriptors::F16(ds),
                plan,
            }
        }
        DType::BF16 => {
            let ds = descs::<half::bf16>(h, d)?;
            let plan = pick(&ds)?;
            Plan {
                descs: Descriptors::BF16(ds),
                plan,
            }
        }
        DType::F32 | DType::I32 => {
            return Err(CudnnError(
                cudarc::cudnn::sys::cudnnStatus_t::CUDNN_STATUS_NOT_SUPPORTED,
            ))
        }
    })
}

/// Every forward algorithm, for autotuning (`TOFFEE_AUTOTUNE=1`).
const ALGOS: [cudnnConvolutionFwdAlgo_t; 8] = [
    cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
    cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
    cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
    cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
    cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_FFT,
    cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
    cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
    cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
];

/// A raw pool pointer seen through cudarc's slice traits.
struct Raw<'a> {
    ptr: u64,
    len: usize,
    stream: &'a Arc<CudaStream>,
}

impl<T> DeviceSlice<T> for Raw<'_> {
    fn len(&self) -> usize {
        self.len
    }
    fn stream(&self) -> &Arc<CudaStream> {
        self.stream
    }
}

impl<T> DevicePtr<T> for Raw<'_> {
    fn device_ptr<'a>(&'a self, _stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
        // One stream per Gpu: stream order is the only synchronisation needed.
        (self.ptr, SyncOnDrop::Sync(None))
    }
}

impl<T> DevicePtrMut<T> for Raw<'_> {
    fn device_ptr_mut<'a>(&'a mut self, _stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
        (self.ptr, SyncOnDrop::Sync(None))
    }
}

impl CudnnPlans {
    pub fn new(cudnn: Arc<Cudnn>, stream: Arc<CudaStream>) -> CudnnPlans {
        CudnnPlans {
            cudnn,
            stream,
            plans: Mutex::new(HashMap::new()),
        }
    }

    pub fn planned(&self) -> usize {
        self.plans.lock().unwrap().len()
    }

    pub fn plan(&self, d: &ConvDesc) -> (Option<ConvPlan>, bool) {
        let mut plans = self.plans.lock().unwrap();
        let fresh = !plans.contains_key(d);
        let p = plans.entry(*d).or_insert_with(|| plan(&self.cudnn, d).ok());
        (p.as_ref().map(|p| p.plan), fresh)
    }

    /// Tries every algorithm cuDNN accepts for the descriptor (workspaces up to 1 GiB), keeps
    /// the fastest.
    pub fn tune(&self, d: &ConvDesc, time: &Timer, run: &dyn Fn(ConvPlan) -> bool) {
        let candidates: Vec<ConvPlan> = {
            let plans = self.plans.lock().unwrap();
            let Some(Some(p)) = plans.get(d) else { return };
            let ws = |algo| match &p.descs {
                Descriptors::F16(ds) => op(ds).get_workspace_size(algo),
                Descriptors::BF16(ds) => op(ds).get_workspace_size(algo),
            };
            ALGOS
                .into_iter()
                .filter_map(|a| {
                    ws(a).ok().map(|b| ConvPlan {
                        algo: a as i32,
                        ws_bytes: b,
                    })
                })
                .filter(|c| c.ws_bytes <= 1 << 30)
                .collect()
        };
        let mut best: Option<(f32, ConvPlan)> = None;
        for c in candidates {
            if let Some(t) = time(&mut || run(c)) {
                if best.is_none_or(|(b, _)| t < b) {
                    best = Some((t, c));
                }
            }
        }
        if let Some((_, c)) = best {
            if let Some(Some(p)) = self.plans.lock().unwrap().get_mut(d) {
                p.plan = c;
            }
        }
    }

    /// Safety: the pointers hold the extents the descriptor describes; `ws` holds
    /// `plan.ws_bytes` bytes.
    pub unsafe fn launch(
        &self,
        d: &ConvDesc,
        plan: ConvPlan,
        (x, w, y, ws): (u64, u64, u64, u64),
    ) -> Result<(), String> {
        let plans = self.plans.lock().unwrap();
        let Some(Some(p)) = plans.get(d) else {
            return Err(format!("convolution {d:?} launched without a plan"));
        };
        let raw = |ptr, len| Raw {
            ptr,
            len,
            stream: &self.stream,
        };
        let (xn, wn, yn) = (
            d.n * d.h * d.w * d.c,
            d.k * d.r * d.s * (d.c / d.groups),
            d.n * d.ho * d.wo * d.k,
        );
        let mut wsr = raw(ws, plan.ws_bytes);
        let mut yr = raw(y, yn);
        let algo = algo_of(plan.algo);
        let r = match &p.descs {
            Descriptors::F16(ds) => op(ds).launch(
                algo,
                Some(&mut wsr),
                (half::f16::ONE, half::f16::ZERO),
                &raw(x, xn),
                &raw(w, wn),
                &mut yr,
            ),
            Descriptors::BF16(ds) => op(ds).launch(
                algo,
                Some(&mut wsr),
                (half::bf16::ONE, half::bf16::ZERO),
                &raw(x, xn),
                &raw(w, wn),
                &mut yr,
            ),
        };
        r.map_err(|e| format!("cuDNN convolution {d:?}: {e:?}"))
    }
}
