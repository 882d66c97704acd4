//! The layer parameters every backend takes: a linear layer's and a convolution's weights (with the
//! layouts each backend wants, chosen at load), and the activations configs name. The CPU
//! reference and the CUDA backend share them; neither owns them.

use crate::tensor::Tensor;

/// A fully connected layer, weights in PyTorch's [out, in] layout.
#[derive(Clone, Debug)]
pub struct LinearW {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl LinearW {
    pub fn in_features(&self) -> usize {
        self.weight.shape()[1]
    }
    pub fn out_features(&self) -> usize {
        self.weight.shape()[0]
    }
}

/// A 2-D convolution. The weight is stored as [kh, kw, in, out] (re-laid out from PyTorch's
/// [out, in, kh, kw] at load time) so that im2col rows multiply it directly.
#[derive(Clone, Debug)]
pub struct Conv2dW {
    /// [kh, kw, in, out] (the CPU's im2col GEMM operand), or [out, kh, kw, in] when `krsc`
    /// (cuDNN's NHWC filter layout, used on GPUs).
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub kernel: usize,
    pub stride: usize,
    /// top, bottom, left, right
    pub pad: [usize; 4],
    pub krsc: bool,
}

impl Conv2dW {
    /// From PyTorch's [out, in, kh, kw] weight.
    pub fn from_oihw(w: &Tensor, bias: Option<Tensor>, stride: usize, padding: usize) -> Conv2dW {
        Conv2dW::relaid(w, bias, stride, padding, false)
    }

    /// From PyTorch's [out, in, kh, kw] weight into cuDNN's NHWC filter layout [out, kh, kw, in].
    pub fn krsc_from_oihw(
        w: &Tensor,
        bias: Option<Tensor>,
        stride: usize,
        padding: usize,
    ) -> Conv2dW {
        Conv2dW::relaid(w, bias, stride, padding, true)
    }

    /// Zeros in the layout `relaid` makes, for a model built from shapes only
    /// (`weights::shapes_only`): nothing to reorder, and the pages are never touched.
    pub fn unread(
        o: usize,
        i: usize,
        k: usize,
        bias: Option<Tensor>,
        stride: usize,
        padding: usize,
        krsc: bool,
    ) -> Conv2dW {
        let shape = if krsc {
            vec![o, k, k, i]
        } else {
            vec![k, k, i, o]
        };
        Conv2dW {
            weight: Tensor::zeros(shape),
            bias,
            kernel: k,
            stride,
            pad: [padding; 4],
            krsc,
        }
    }

    fn relaid(
        w: &Tensor,
        bias: Option<Tensor>,
        stride: usize,
        padding: usize,
        krsc: bool,
    ) -> Conv2dW {
        let s = w.shape();
        let (o, i, k, kw) = (s[0], s[1], s[2], s[3]);
        assert_eq!(k, kw, "only square kernels are used by the models");
        let src = w.data();
        let mut dst = vec![0.0f32; w.numel()];
        for oo in 0..o {
            for ii in 0..i {
                for y in 0..k {
                    for x in 0..k {
                        let d = if krsc {
                            ((oo * k + y) * k + x) * i + ii
                        } else {
                            ((y * k + x) * i + ii) * o + oo
                        };
                        dst[d] = src[((oo * i + ii) * k + y) * k + x];
                    }
                }
            }
        }
        let shape = if krsc {
            vec![o, k, k, i]
        } else {
            vec![k, k, i, o]
        };
        Conv2dW {
            weight: Tensor::new(shape, dst),
            bias,
            kernel: k,
            stride,
            pad: [padding; 4],
            krsc,
        }
    }

    pub fn in_channels(&self) -> usize {
        if self.krsc {
            self.weight.shape()[3]
        } else {
            self.weight.shape()[2]
        }
    }
    pub fn out_channels(&self) -> usize {
        if self.krsc {
            self.weight.shape()[0]
        } else {
            self.weight.shape()[3]
        }
    }
}

/// The activations configs name; unknown names are rejected when the config is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Silu,
    Gelu,
    QuickGelu,
    /// The ViT pooler's activation.
    Tanh,
    /// Decoders and heads of the segmentation and depth models.
    Relu,
    Sigmoid,
}

impl Activation {
    pub fn parse(name: &str) -> Option<Activation> {
        match name {
            "silu" | "swish" => Some(Activation::Silu),
            "gelu" => Some(Activation::Gelu),
            "quick_gelu" => Some(Activation::QuickGelu),
            "tanh" => Some(Activation::Tanh),
            "relu" => Some(Activation::Relu),
            "sigmoid" => Some(Activation::Sigmoid),
            _ => None,
        }
    }
}
