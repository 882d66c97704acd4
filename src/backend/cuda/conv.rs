//! Library convolutions (cuDNN on a GPU): the descriptor values are derived here, once, from the
//! tensors, and both devices build their plans from this `ConvDesc` — so a wrong stride, padding
//! or layout gives a wrong number on the software device too. Plans are cached per descriptor by
//! the driver; a steady-state call only takes its workspace from the pool (the capture's reserve
//! inside a graph) and launches.

use super::DevBuf;
use crate::backend::layer::Conv2dW;
use crate::tensor::Tensor;

/// The device buffer of a tensor the backend dispatched here (ops call this module, not the reverse).
fn dev(t: &Tensor) -> &DevBuf {
    t.dev().expect("a device tensor")
}

/// A forward convolution as cuDNN's descriptors state it: x NHWC [n, h, w, c], filter KRSC
/// [k, r, s, c / groups] ("NHWC" filter format), y NHWC [n, ho, wo, k], cross-correlation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvDesc {
    pub dtype: super::DType,
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub k: usize,
    pub r: usize,
    pub s: usize,
    /// Symmetric padding (top = bottom, left = right), as cuDNN's 2-D descriptor has it.
    pub pad: (usize, usize),
    pub stride: (usize, usize),
    pub dilation: (usize, usize),
    pub groups: usize,
    /// Output extent, as the output tensor descriptor states it.
    pub ho: usize,
    pub wo: usize,
}

impl ConvDesc {
    /// The descriptor of `conv(x)` with weights `c` (square kernel, symmetric padding, no
    /// dilation or groups: what our models use).
    pub fn new(x: &Tensor, c: &Conv2dW) -> ConvDesc {
        let (n, h, w, cin) = x.dims4();
        let k = c.kernel;
        let [pt, _, pl, _] = c.pad;
        ConvDesc {
            dtype: dev(x).dtype,
            n,
            h,
            w,
            c: cin,
            k: c.out_channels(),
            r: k,
            s: k,
            pad: (pt, pl),
            stride: (c.stride, c.stride),
            dilation: (1, 1),
            groups: 1,
            ho: (h + 2 * pt - k) / c.stride + 1,
            wo: (w + 2 * pl - k) / c.stride + 1,
        }
    }
}

/// Queues o = conv(x) without bias through the library (NHWC, KRSC weights, symmetric padding,
/// fp32 accumulation). False when the library refuses the configuration, so the caller falls
/// back to im2col.
pub fn conv(x: &Tensor, c: &Conv2dW, o: &DevBuf) -> bool {
    let desc = ConvDesc::new(x, c);
    let (xd, wd) = (dev(x), dev(&c.weight));
    let g = xd.gpu();
    let driver = g.driver();
    if !driver.has_conv() {
        return false;
    }
    let (plan, fresh) = driver.conv_plan(&desc);
    let Some(plan) = plan else {
        return false;
    };
    // The workspace comes from the pool for this call only: later work on the one stream is
    // ordered after it.
    let run = |p: super::driver::ConvPlan| {
        let ws = g.alloc(p.ws_bytes.div_ceil(4).max(1), super::DType::F32);
        if g.failed() {
            // No workspace: nothing may launch on null pointers.
            return false;
        }
        match driver.conv(&desc, p, xd.ptr(), wd.ptr(), o.ptr(), ws.ptr()) {
            Ok(()) => true,
            Err(e) => {
                g.fail(e);
                false
            }
        }
    };
    if fresh && g.autotune() {
        let tune = |f: &mut dyn FnMut() -> bool| g.time_ms(f);
        driver.conv_tune(&desc, &tune, &run);
        // The tuned plan replaces the heuristic's.
        let (Some(plan), _) = driver.conv_plan(&desc) else {
            return false;
        };
        return run(plan) || g.failed();
    }
    run(plan) || g.failed()
}
