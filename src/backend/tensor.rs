//! A dense tensor: f32 on the host, or fp16/bf16/f32 on a GPU (`cuda` or `emu` feature). Its
//! storage is the backend's business, so the type lives in the backend layer (`crate::tensor`
//! re-exports it for everything above).
//! Activations inside the engine are NHWC; the NCHW layout of diffusers exists only at the edges
//! (`forward` inputs and outputs, on the host), converted by `to_nhwc`/`to_nchw`.

use std::sync::Arc;

#[derive(Clone, Debug)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Arc<Vec<f32>>,
    /// Some: the values live on a GPU and `data` is empty.
    #[cfg(feature = "gpu")]
    dev: Option<super::cuda::DevBuf>,
}

impl Tensor {
    /// Panics when `data` does not hold exactly `shape.iter().product()` values: a caller bug, not bad input.
    pub fn new(shape: impl Into<Vec<usize>>, data: Vec<f32>) -> Self {
        let shape = shape.into();
        let n: usize = shape.iter().product();
        assert_eq!(
            n,
            data.len(),
            "tensor shape {shape:?} does not match {} values",
            data.len()
        );
        Tensor {
            shape,
            data: Arc::new(data),
            #[cfg(feature = "gpu")]
            dev: None,
        }
    }

    pub fn zeros(shape: impl Into<Vec<usize>>) -> Self {
        let shape = shape.into();
        let n = shape.iter().product();
        Tensor::new(shape, vec![0.0; n])
    }

    pub fn scalar(v: f32) -> Self {
        Tensor::new(Vec::new(), vec![v])
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Size of the last dimension (channels in NHWC, features in token layouts).
    pub fn last_dim(&self) -> usize {
        *self.shape.last().unwrap_or(&1)
    }

    /// Host values. Device tensors must be brought to the host first (`to_host`): calling this on
    /// one is a bug in the caller.
    pub fn data(&self) -> &[f32] {
        self.assert_host();
        &self.data
    }

    /// Mutable access; copies only when the buffer is shared.
    pub fn data_mut(&mut self) -> &mut [f32] {
        self.assert_host();
        Arc::make_mut(&mut self.data).as_mut_slice()
    }

    pub fn into_vec(self) -> Vec<f32> {
        self.assert_host();
        Arc::try_unwrap(self.data).unwrap_or_else(|a| (*a).clone())
    }

    fn assert_host(&self) {
        #[cfg(feature = "gpu")]
        assert!(
            self.dev.is_none(),
            "host access to a device tensor {:?}",
            self.shape
        );
    }

    pub fn is_host(&self) -> bool {
        #[cfg(feature = "gpu")]
        return self.dev.is_none();
        #[cfg(not(feature = "gpu"))]
        true
    }

    /// A tensor of `shape` whose values live on a device.
    #[cfg(feature = "gpu")]
    pub fn from_device(shape: Vec<usize>, buf: super::cuda::DevBuf) -> Tensor {
        Tensor {
            shape,
            data: Arc::new(Vec::new()),
            dev: Some(buf),
        }
    }

    #[cfg(feature = "gpu")]
    pub fn dev(&self) -> Option<&super::cuda::DevBuf> {
        self.dev.as_ref()
    }

    /// The same values on the host (a copy and a synchronisation for device tensors).
    pub fn to_host(&self) -> anyhow::Result<Tensor> {
        #[cfg(feature = "gpu")]
        if let Some(d) = &self.dev {
            return Ok(Tensor::new(self.shape.clone(), d.download()?));
        }
        Ok(self.clone())
    }

    pub fn reshape(&self, shape: impl Into<Vec<usize>>) -> Tensor {
        let shape = shape.into();
        assert_eq!(
            shape.iter().product::<usize>(),
            self.numel(),
            "reshape {:?} -> {shape:?}",
            self.shape
        );
        let mut t = self.clone();
        t.shape = shape;
        t
    }

    /// (N, H, W, C) of a rank-4 NHWC tensor.
    pub fn dims4(&self) -> (usize, usize, usize, usize) {
        assert_eq!(
            self.rank(),
            4,
            "expected a rank-4 tensor, got {:?}",
            self.shape
        );
        (self.shape[0], self.shape[1], self.shape[2], self.shape[3])
    }

    /// NCHW -> NHWC (host).
    pub fn to_nhwc(&self) -> Tensor {
        let (n, c, h, w) = self.dims4();
        let src = self.data();
        let mut out = vec![0.0f32; self.numel()];
        for b in 0..n {
            for ch in 0..c {
                for y in 0..h {
                    let s = ((b * c + ch) * h + y) * w;
                    for x in 0..w {
                        out[((b * h + y) * w + x) * c + ch] = src[s + x];
                    }
                }
            }
        }
        Tensor::new(vec![n, h, w, c], out)
    }

    /// NHWC -> NCHW (host).
    pub fn to_nchw(&self) -> Tensor {
        let (n, h, w, c) = self.dims4();
        let src = self.data();
        let mut out = vec![0.0f32; self.numel()];
        for b in 0..n {
            for y in 0..h {
                for x in 0..w {
                    let s = ((b * h + y) * w + x) * c;
                    for ch in 0..c {
                        out[((b * c + ch) * h + y) * w + x] = src[s + ch];
                    }
                }
            }
        }
        Tensor::new(vec![n, c, h, w], out)
    }

    /// Rows `start..start+len` of the first dimension.
    pub fn narrow0(&self, start: usize, len: usize) -> Tensor {
        let row: usize = self.shape[1..].iter().product();
        let mut shape = self.shape.clone();
        shape[0] = len;
        #[cfg(feature = "gpu")]
        if let Some(d) = &self.dev {
            return Tensor::from_device(shape, d.copy_range(start * row, len * row));
        }
        Tensor::new(shape, self.data[start * row..(start + len) * row].to_vec())
    }

    /// Concatenation along the first dimension (all parts on the same device).
    pub fn cat0(parts: &[&Tensor]) -> Tensor {
        let mut shape = parts[0].shape.clone();
        shape[0] = parts.iter().map(|p| p.shape[0]).sum();
        for p in parts {
            assert_eq!(
                p.shape[1..],
                parts[0].shape[1..],
                "cat0 of mismatched shapes"
            );
        }
        #[cfg(feature = "gpu")]
        if parts[0].dev.is_some() {
            let bufs: Vec<&super::cuda::DevBuf> = parts
                .iter()
                .map(|p| p.dev.as_ref().expect("cat0 of host and device tensors"))
                .collect();
            return Tensor::from_device(shape, super::cuda::DevBuf::concat(&bufs));
        }
        let mut data = Vec::with_capacity(shape.iter().product());
        for p in parts {
            data.extend_from_slice(p.data());
        }
        Tensor::new(shape, data)
    }

    /// Largest absolute elementwise difference (host tensors); shapes must match; NaN counts as ∞.
    pub fn max_abs_diff(&self, other: &Tensor) -> f32 {
        assert_eq!(self.shape, other.shape, "max_abs_diff of different shapes");
        self.data()
            .iter()
            .zip(other.data().iter())
            .map(|(a, b)| {
                if a.is_nan() || b.is_nan() {
                    f32::INFINITY
                } else {
                    (a - b).abs()
                }
            })
            .fold(0.0, f32::max)
    }
}
