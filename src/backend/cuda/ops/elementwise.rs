//! The memory-bound glue (kernels/elementwise.cu): activations, adds, broadcasts, channel
//! concat/slice, resizes, embeddings, the scheduler's linear combinations, casts.

use super::*;

/// y = kernel(x, y, n, extra…) for the elementwise kernels whose output is shaped like the input.
pub(super) fn map(
    x: &Tensor,
    kernel: impl FnOnce(&Gpu, DType, (u32, u32), u64, u64, i64),
) -> Tensor {
    let xd = dev(x);
    let (t, o) = out(xd, x.shape().to_vec());
    let n = x.numel();
    kernel(xd.gpu(), xd.dtype, grid(n), xd.ptr(), o.ptr(), n as i64);
    t
}

/// act(a·x + b): kind 0 SiLU, 1 GELU, 2 quick GELU, 3 identity, 4 tanh.
pub(super) fn act(x: &Tensor, kind: i32, a: f32, b: f32) -> Tensor {
    map(x, |g, dt, grid, x, y, n| {
        kernels::act(g, dt, grid, x, y, n, kind, a, b)
    })
}

pub(super) fn act_kind(a: Activation) -> i32 {
    match a {
        Activation::Silu => 0,
        Activation::Gelu => 1,
        Activation::QuickGelu => 2,
        Activation::Tanh => 4,
        Activation::Relu => 5,
        Activation::Sigmoid => 6,
    }
}

pub fn activation(x: &Tensor, a: Activation) -> Tensor {
    act(x, act_kind(a), 1.0, 0.0)
}

pub fn affine(x: &Tensor, a: f32, b: f32) -> Tensor {
    act(x, 3, a, b)
}

pub fn affine_clamp(x: &Tensor, a: f32, b: f32, lo: f32, hi: f32) -> Tensor {
    map(x, |g, dt, grid, x, y, n| {
        kernels::affine_clamp(g, dt, grid, x, y, n, a, b, lo, hi)
    })
}

pub fn glu(x: &Tensor, a: Activation) -> Tensor {
    let c = x.last_dim() / 2;
    let rows = x.numel() / (2 * c);
    let xd = dev(x);
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = c;
    let (t, o) = out(xd, shape);
    kernels::glu(
        xd.gpu(),
        xd.dtype,
        grid(rows * c),
        xd.ptr(),
        o.ptr(),
        rows as i64,
        c as i32,
        act_kind(a),
    );
    t
}

pub fn add_scaled(a: &Tensor, b: &Tensor, s: f32) -> Tensor {
    let ad = dev(a);
    let (t, o) = out(ad, a.shape().to_vec());
    let n = a.numel();
    kernels::add_scaled(
        ad.gpu(),
        ad.dtype,
        grid(n),
        ad.ptr(),
        dev(b).ptr(),
        o.ptr(),
        n as i64,
        s,
    );
    t
}

pub fn add_per_sample_channels(x: &Tensor, v: &Tensor) -> Tensor {
    let n = x.shape()[0];
    let c = x.last_dim();
    let per = x.numel() / n;
    let xd = dev(x);
    let (t, o) = out(xd, x.shape().to_vec());
    kernels::add_broadcast(
        xd.gpu(),
        xd.dtype,
        grid(x.numel()),
        xd.ptr(),
        dev(v).ptr(),
        o.ptr(),
        x.numel() as i64,
        per as i64,
        c as i32,
        n as i32,
    );
    t
}

pub fn concat_channels(parts: &[&Tensor]) -> Tensor {
    let lead = &parts[0].shape()[..parts[0].rank() - 1];
    let rows: usize = lead.iter().product();
    let total: usize = parts.iter().map(|p| p.last_dim()).sum();
    let d0 = dev(parts[0]);
    let mut shape = lead.to_vec();
    shape.push(total);
    let (t, o) = out(d0, shape);
    let mut off = 0;
    for p in parts {
        let pd = dev(p);
        let c = p.last_dim();
        kernels::place_channels(
            pd.gpu(),
            pd.dtype,
            grid(rows * c),
            pd.ptr(),
            c as i32,
            o.ptr(),
            total as i32,
            off as i32,
            rows as i64,
        );
        off += c;
    }
    t
}

pub fn slice_channels(x: &Tensor, start: usize, len: usize) -> Tensor {
    let c = x.last_dim();
    let rows = x.numel() / c;
    let xd = dev(x);
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = len;
    let (t, o) = out(xd, shape);
    kernels::slice_channels(
        xd.gpu(),
        xd.dtype,
        grid(rows * len),
        xd.ptr(),
        c as i32,
        o.ptr(),
        len as i32,
        start as i32,
        rows as i64,
    );
    t
}

pub fn upsample_nearest(x: &Tensor, oh: usize, ow: usize) -> Tensor {
    let (n, h, w, c) = x.dims4();
    let xd = dev(x);
    let (t, o) = out(xd, vec![n, oh, ow, c]);
    kernels::upsample_nearest(
        xd.gpu(),
        xd.dtype,
        grid(n * oh * ow * c),
        xd.ptr(),
        o.ptr(),
        n as i32,
        h as i32,
        w as i32,
        c as i32,
        oh as i32,
        ow as i32,
    );
    t
}

pub fn depth_to_space(x: &Tensor, k: usize) -> Tensor {
    let (n, h, w, ckk) = x.dims4();
    let c = ckk / (k * k);
    let xd = dev(x);
    let (t, o) = out(xd, vec![n, h * k, w * k, c]);
    kernels::depth_to_space(
        xd.gpu(),
        xd.dtype,
        grid(x.numel()),
        xd.ptr(),
        o.ptr(),
        n as i32,
        h as i32,
        w as i32,
        c as i32,
        k as i32,
    );
    t
}

pub fn resize_bilinear(x: &Tensor, oh: usize, ow: usize, align_corners: bool) -> Tensor {
    let (n, h, w, c) = x.dims4();
    let xd = dev(x);
    let (t, o) = out(xd, vec![n, oh, ow, c]);
    kernels::resize_bilinear(
        xd.gpu(),
        xd.dtype,
        grid(n * oh * ow * c),
        xd.ptr(),
        o.ptr(),
        n as i32,
        h as i32,
        w as i32,
        c as i32,
        oh as i32,
        ow as i32,
        align_corners as i32,
    );
    t
}

pub fn film(x: &Tensor, mul: &Tensor, add: &Tensor) -> Tensor {
    let n = x.shape()[0];
    let c = x.last_dim();
    let xd = dev(x);
    let (t, o) = out(xd, x.shape().to_vec());
    kernels::film(
        xd.gpu(),
        xd.dtype,
        grid(x.numel()),
        xd.ptr(),
        dev(mul).ptr(),
        dev(add).ptr(),
        o.ptr(),
        x.numel() as i64,
        (x.numel() / n) as i64,
        c as i32,
    );
    t
}

/// `t`: f32 device timesteps [B].
pub fn timestep_embedding(
    t: &Tensor,
    dim: usize,
    flip: bool,
    shift: f32,
    gpu: &Arc<Gpu>,
) -> Tensor {
    let td = dev(t);
    let b = t.numel();
    let o = gpu.alloc(b * dim, gpu.dtype);
    kernels::timestep_embedding(
        gpu,
        gpu.dtype,
        grid(b * dim),
        td.ptr(),
        o.ptr(),
        b as i32,
        dim as i32,
        flip as i32,
        shift,
    );
    Tensor::from_device(vec![b, dim], o)
}

/// Rows `idx` (an I32 device tensor) of a [rows, d] device tensor.
pub fn gather(table: &Tensor, idx: &Tensor) -> Tensor {
    let d = table.last_dim();
    let td = dev(table);
    let ids = dev(idx);
    let g = td.gpu();
    if ids.dtype != DType::I32 {
        g.fail("row indices must be i32 on the device");
    }
    let n = idx.numel();
    let (t, o) = out(td, vec![n, d]);
    kernels::gather_rows(
        g,
        td.dtype,
        grid(n * d),
        td.ptr(),
        ids.ptr(),
        o.ptr(),
        n as i64,
        d as i32,
    );
    t
}

/// c0·t0 + c1·t1 + … (up to four terms), in the dtype of t0.
pub fn lincomb(terms: &[(&Tensor, f32)]) -> Tensor {
    let d0 = dev(terms[0].0);
    let n = terms[0].0.numel();
    let (t, o) = out(d0, terms[0].0.shape().to_vec());
    // Absent terms are null pointers with coefficient 0 (the kernel skips them).
    let term = |i: usize| terms.get(i).map_or((0, 0.0), |(x, c)| (dev(x).ptr(), *c));
    let [(t0, c0), (t1, c1), (t2, c2), (t3, c3)] = [0, 1, 2, 3].map(term);
    kernels::lincomb(
        d0.gpu(),
        d0.dtype,
        grid(n),
        t0,
        c0,
        t1,
        c1,
        t2,
        c2,
        t3,
        c3,
        o.ptr(),
        n as i64,
    );
    t
}

pub fn cfg_combine(pred: &Tensor, guidance: f32) -> Tensor {
    let pd = dev(pred);
    let half = pred.numel() / 2;
    let mut shape = pred.shape().to_vec();
    shape[0] /= 2;
    let (t, o) = out(pd, shape);
    kernels::cfg_combine(
        pd.gpu(),
        pd.dtype,
        grid(half),
        pd.ptr(),
        o.ptr(),
        half as i64,
        guidance,
    );
    t
}

pub fn mask_mix(a: &Tensor, b: &Tensor, mask: &Tensor) -> Tensor {
    let ad = dev(a);
    let c = a.last_dim();
    let px = a.numel() / c;
    let (t, o) = out(ad, a.shape().to_vec());
    kernels::mask_mix(
        ad.gpu(),
        ad.dtype,
        grid(px * c),
        ad.ptr(),
        dev(b).ptr(),
        dev(mask).ptr(),
        o.ptr(),
        px as i64,
        c as i32,
    );
    t
}

pub fn gauss_sample(mean: &Tensor, logvar: &Tensor, noise: &Tensor, scale: f32) -> Tensor {
    let md = dev(mean);
    let n = mean.numel();
    let (t, o) = out(md, mean.shape().to_vec());
    kernels::gauss_sample(
        md.gpu(),
        md.dtype,
        grid(n),
        md.ptr(),
        dev(logvar).ptr(),
        dev(noise).ptr(),
        o.ptr(),
        n as i64,
        scale,
    );
    t
}

/// The same values in another storage type.
pub fn cast(x: &Tensor, dtype: DType) -> Tensor {
    let xd = dev(x);
    if xd.dtype == dtype {
        return x.clone();
    }
    let g = xd.gpu();
    let o = g.alloc(x.numel(), dtype);
    let n = x.numel();
    let kernel = match (xd.dtype, dtype) {
        (DType::F32, DType::F16) => kernels::cast_f32_f16,
        (DType::F32, DType::BF16) => kernels::cast_f32_bf16,
        (DType::F16, DType::F32) => kernels::cast_f16_f32,
        (DType::BF16, DType::F32) => kernels::cast_bf16_f32,
        (DType::F16, DType::BF16) => kernels::cast_f16_bf16,
        (DType::BF16, DType::F16) => kernels::cast_bf16_f16,
        (a, b) => {
            g.fail(format!("no cast from {a:?} to {b:?}"));
            return Tensor::from_device(x.shape().to_vec(), o);
        }
    };
    kernel(g, grid(n), xd.ptr(), o.ptr(), n as i64);
    Tensor::from_device(x.shape().to_vec(), o)
}
