//! `toffee._toffee.Embedder`: an image encoder loaded as `toffee embed` loads it
//! (`ImageEncoder::load`), and `cmd::embed::embed` (the CLI's function) on files or pixels: the
//! same tensors `toffee embed` writes to its safetensors file.

use crate::py_result;
use crate::source::{ImageArg, Source};
use anyhow::{bail, Result};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::path::PathBuf;
use toffee::models::load::open_device;
use toffee::pipeline::score::ImageEncoder;

/// One output tensor: (name, shape, little-endian f32 bytes).
type Output<'py> = (String, Vec<usize>, Bound<'py, PyBytes>);
type Tensors = Vec<(String, Vec<usize>, Vec<u8>)>;

#[pyclass(frozen, module = "toffee._toffee")]
pub struct Embedder {
    enc: ImageEncoder,
}

fn embed(enc: &ImageEncoder, images: Vec<Source>) -> Result<Tensors> {
    if images.is_empty() {
        bail!("images: give at least one image");
    }
    let imgs = images
        .into_iter()
        .enumerate()
        .map(|(i, s)| s.rgb8(&format!("images[{i}]")))
        .collect::<Result<Vec<_>>>()?;
    Ok(toffee::cmd::embed::embed(enc, &imgs)?
        .into_iter()
        .map(|(name, t)| {
            let bytes = t.data().iter().flat_map(|v| v.to_le_bytes()).collect();
            (name, t.shape().to_vec(), bytes)
        })
        .collect())
}

#[pymethods]
impl Embedder {
    /// An image-encoder folder, a CLIPModel folder or a pipeline with an image_encoder, on
    /// `device` (as `toffee embed --model`).
    #[new]
    #[pyo3(signature = (model, device="cpu".to_string()))]
    fn new(py: Python<'_>, model: PathBuf, device: String) -> PyResult<Embedder> {
        let loaded = py.detach(|| {
            let dev = open_device(&device, Some(&model), "")?;
            ImageEncoder::load(&model, &dev)
        });
        Ok(Embedder {
            enc: py_result(loaded)?,
        })
    }

    /// pixel_values and the encoder's outputs for `images` (one row each, in order).
    fn embed<'py>(
        &self,
        py: Python<'py>,
        images: Vec<ImageArg<'py>>,
    ) -> PyResult<Vec<Output<'py>>> {
        let sources = images
            .iter()
            .enumerate()
            .map(|(i, a)| Source::read(a, &format!("images[{i}]")))
            .collect::<Result<Vec<_>>>();
        let sources = py_result(sources)?;
        let enc = &self.enc;
        let out = py_result(py.detach(|| embed(enc, sources)))?;
        Ok(out
            .into_iter()
            .map(|(n, shape, bytes)| (n, shape, PyBytes::new(py, &bytes)))
            .collect())
    }
}
