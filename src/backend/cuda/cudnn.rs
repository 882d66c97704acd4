//! cuDNN convolutions planned once per shape (UNTESTED ON A GPU, see mod.rs): descriptors and the
//! algorithm (the heuristic's first choice, or the fastest measured with `TOFFEE_AUTOTUNE=1`) are
//! kept per (dtype, shape), refusals too, so a steady-state call only takes its workspace from the
//! pool (the capture's reserve inside a graph) and launches.

use super::ops::{dev, Raw};
use super::{DType, DevBuf};
use crate::backend::cpu::Conv2dW;
use crate::tensor::Tensor;
use cudarc::cudnn::sys::{
    cudnnConvolutionFwdAlgo_t, cudnnConvolutionMode_t, cudnnMathType_t, cudnnTensorFormat_t,
};
use cudarc::cudnn::{
    ConvDescriptor, ConvForward, Cudnn, CudnnDataType, CudnnError, FilterDescriptor,
    TensorDescriptor,
};
use std::collections::HashMap;
use std::sync::Arc;

/// What a convolution plan depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    dtype: DType,
    /// n, h, w, cin, cout, kernel, stride, pad (top), pad (left).
    dims: [usize; 9],
}

struct Descs<T> {
    x: TensorDescriptor<T>,
    w: FilterDescriptor<T>,
    y: TensorDescriptor<T>,
    conv: ConvDescriptor<f32>,
    algo: cudnnConvolutionFwdAlgo_t,
    ws_bytes: usize,
}

enum Plan {
    F16(Descs<half::f16>),
    BF16(Descs<half::bf16>),
}

/// cudarc's cuDNN handle and this Gpu's plans. The handle holds a raw pointer; every use goes
/// through the Gpu's mutex and its single stream, which is what makes sharing it sound.
pub struct CudnnHandle {
    cudnn: Arc<Cudnn>,
    /// None: cuDNN refused the shape (the caller falls back to im2col), asked once.
    plans: HashMap<Key, Option<Plan>>,
}

// Safety: see above — access is serialised by the Mutex in `Gpu`.
unsafe impl Send for CudnnHandle {}

fn plan<T: CudnnDataType>(h: &Arc<Cudnn>, k: &Key) -> Result<Descs<T>, CudnnError> {
    let [n, hh, ww, cin, cout, kernel, stride, pt, pl] = k.dims.map(|v| v as i32);
    let (ho, wo) = (
        (hh + 2 * pt - kernel) / stride + 1,
        (ww + 2 * pl - kernel) / stride + 1,
    );
    let nhwc = cudnnTensorFormat_t::CUDNN_TENSOR_NHWC;
    let x = h.create_4d_tensor::<T>(nhwc, [n, cin, hh, ww])?;
    let w = h.create_4d_filter::<T>(nhwc, [cout, cin, kernel, kernel])?;
    let y = h.create_4d_tensor::<T>(nhwc, [n, cout, ho, wo])?;
    let mut conv = h.create_conv2d::<f32>(
        [pt, pl],
        [stride, stride],
        [1, 1],
        cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
    )?;
    conv.set_math_type(cudnnMathType_t::CUDNN_TENSOR_OP_MATH)?;
    let op = ConvForward {
        conv: &conv,
        x: &x,
        w: &w,
        y: &y,
    };
    let algo = op.pick_algorithm()?;
    let ws_bytes = op.get_workspace_size(algo)?;
    Ok(Descs {
        x,
        w,
        y,
        conv,
        algo,
        ws_bytes,
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

/// Replaces the heuristic's choice by the fastest algorithm cuDNN accepts for the shape, timed on
/// this call's buffers (y is only written). Workspaces over 1 GiB are not considered.
///
/// Safety: as `launch`.
unsafe fn tune<T: CudnnDataType + Copy>(
    d: &mut Descs<T>,
    scalars: (T, T),
    x: &DevBuf,
    w: &DevBuf,
    y: &DevBuf,
) {
    let mut best: Option<(f32, cudnnConvolutionFwdAlgo_t, usize)> = None;
    for algo in ALGOS {
        let op = ConvForward {
            conv: &d.conv,
            x: &d.x,
            w: &d.w,
            y: &d.y,
        };
        let Ok(ws_bytes) = op.get_workspace_size(algo) else {
            continue;
        };
        if ws_bytes > 1 << 30 {
            continue;
        }
        let t = x
            .gpu()
            .time_ms(|| launch(d, (algo, ws_bytes), scalars, x, w, y).is_ok());
        if let Some(t) = t {
            if best.is_none_or(|(b, _, _)| t < b) {
                best = Some((t, algo, ws_bytes));
            }
        }
    }
    if let Some((_, algo, ws_bytes)) = best {
        d.algo = algo;
        d.ws_bytes = ws_bytes;
    }
}

/// Safety: the buffers hold the extents the descriptors describe.
unsafe fn launch<T: CudnnDataType>(
    d: &Descs<T>,
    (algo, ws_bytes): (cudnnConvolutionFwdAlgo_t, usize),
    (one, zero): (T, T),
    x: &DevBuf,
    w: &DevBuf,
    y: &DevBuf,
) -> Result<(), CudnnError> {
    let g = x.gpu();
    let ws = g.alloc(ws_bytes.div_ceil(4).max(1), DType::F32);
    if g.failed() {
        // No workspace: nothing may launch on null pointers.
        return Ok(());
    }
    let raw = |b: &DevBuf, len| Raw {
        ptr: b.ptr(),
        len,
        gpu: g,
    };
    let mut wsr = raw(&ws, ws_bytes);
    let mut yr = raw(y, y.len);
    let op = ConvForward {
        conv: &d.conv,
        x: &d.x,
        w: &d.w,
        y: &d.y,
    };
    op.launch(
        algo,
        Some(&mut wsr),
        (one, zero),
        &raw(x, x.len),
        &raw(w, w.len),
        &mut yr,
    )
}

impl CudnnHandle {
    pub fn new(cudnn: Arc<Cudnn>) -> CudnnHandle {
        CudnnHandle {
            cudnn,
            plans: HashMap::new(),
        }
    }

    /// Shapes planned so far (refusals included).
    pub fn plans(&self) -> usize {
        self.plans.len()
    }

    /// Queues o = conv(x) without bias (NHWC, KRSC weights, symmetric padding, fp32
    /// accumulation). False when cuDNN refuses the configuration, so the caller falls back.
    pub fn conv(&mut self, x: &Tensor, c: &Conv2dW, o: &DevBuf) -> bool {
        let (n, h, w, cin) = x.dims4();
        let xd = dev(x);
        let key = Key {
            dtype: xd.dtype,
            dims: [
                n,
                h,
                w,
                cin,
                c.out_channels(),
                c.kernel,
                c.stride,
                c.pad[0],
                c.pad[2],
            ],
        };
        let cudnn = &self.cudnn;
        let wd = dev(&c.weight);
        let (h16, hb16) = (
            (half::f16::ONE, half::f16::ZERO),
            (half::bf16::ONE, half::bf16::ZERO),
        );
        let p = self.plans.entry(key).or_insert_with(|| {
            let mut p = match key.dtype {
                DType::F16 => plan(cudnn, &key).ok().map(Plan::F16),
                DType::BF16 => plan(cudnn, &key).ok().map(Plan::BF16),
                DType::F32 | DType::I32 => None,
            };
            if xd.gpu().autotune() {
                // Safety: the descriptors were built from these tensors' shapes (the key).
                unsafe {
                    match &mut p {
                        Some(Plan::F16(d)) => tune(d, h16, xd, wd, o),
                        Some(Plan::BF16(d)) => tune(d, hb16, xd, wd, o),
                        None => {}
                    }
                }
            }
            p
        });
        // Safety: as above.
        let r = unsafe {
            match p {
                None => return false,
                Some(Plan::F16(d)) => launch(d, (d.algo, d.ws_bytes), h16, xd, wd, o),
                Some(Plan::BF16(d)) => launch(d, (d.algo, d.ws_bytes), hb16, xd, wd, o),
            }
        };
        r.is_ok()
    }
}
