//! Raw 8-bit pixels from Python, `(data: bytes, height, width, channels)` in row-major HWC
//! order, checked and turned into the library's image types exactly as its file loaders would
//! turn a PNG holding the same pixels (`v / 255` for tensors; the bytes as they are for the
//! scorer's RGB images).

use anyhow::{bail, Result};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use toffee::pipeline::request::MAX_SIDE;
use toffee::pipeline::score::Mask;
use toffee::tensor::Tensor;

/// An image handed over by python/toffee/__init__.py; `what` names the argument in errors.
pub struct Pixels {
    pub data: Vec<u8>,
    pub height: usize,
    pub width: usize,
    pub channels: usize,
}

/// The Python side's tuple `(bytes, height, width, channels)`.
pub type RawImage<'py> = (Bound<'py, PyBytes>, usize, usize, usize);

impl Pixels {
    /// Copies the tuple's bytes after checking the sides (bounded like the C ABI's images, so a
    /// wrong shape is refused before anything is allocated) and that the length matches.
    pub fn read(raw: &RawImage<'_>, what: &str) -> Result<Pixels> {
        let (data, height, width, channels) = (raw.0.as_bytes(), raw.1, raw.2, raw.3);
        for (side, v) in [("height", height), ("width", width)] {
            if !(1..=MAX_SIDE).contains(&v) {
                bail!("{what} {side} is {v}: each side must be 1 to {MAX_SIDE}");
            }
        }
        if !(1..=4).contains(&channels) {
            bail!("{what} has {channels} channels: expected 1 to 4");
        }
        let want = height * width * channels;
        if data.len() != want {
            bail!(
                "{what} has {} bytes; {height}x{width}x{channels} needs {want}",
                data.len()
            );
        }
        Ok(Pixels {
            data: data.to_vec(),
            height,
            width,
            channels,
        })
    }

    /// Channel `c` of every pixel, as floats in [0, 1] (`v / 255`, numpy's and the loaders' rule).
    fn channel_tensor(&self, channels: &[usize]) -> Tensor {
        let data = self
            .data
            .chunks_exact(self.channels)
            .flat_map(|px| channels.iter().map(move |&c| px[c] as f32 / 255.0))
            .collect();
        Tensor::new(vec![1, self.height, self.width, channels.len()], data)
    }

    /// `[1, H, W, 3]` and, for RGBA, the alpha `[1, H, W, 1]`: what `image_io::load` gives for a
    /// PNG with these pixels.
    pub fn rgb_and_alpha(&self, what: &str) -> Result<(Tensor, Option<Tensor>)> {
        match self.channels {
            3 => Ok((self.channel_tensor(&[0, 1, 2]), None)),
            4 => Ok((
                self.channel_tensor(&[0, 1, 2]),
                Some(self.channel_tensor(&[3])),
            )),
            c => bail!("{what} has {c} channels: expected an RGB or RGBA image"),
        }
    }

    /// `[1, H, W, 3]` of an RGB image (control images).
    pub fn rgb(&self, what: &str) -> Result<Tensor> {
        match self.channels {
            3 => Ok(self.channel_tensor(&[0, 1, 2])),
            c => bail!("{what} has {c} channels: expected an RGB image"),
        }
    }

    /// `[1, H, W, 1]` of a one-channel mask (white = 1), as `image_io::load_mask` reads a gray
    /// PNG (python/toffee converts colour masks with the same luminance rule first).
    pub fn gray(&self, what: &str) -> Result<Tensor> {
        match self.channels {
            1 => Ok(self.channel_tensor(&[0])),
            c => bail!("{what} has {c} channels: expected a one-channel mask"),
        }
    }

    /// An RGB image for the scorer, the bytes as given (RGBA is composited on white on the
    /// Python side, as `load_rgb8_on_white` does for files).
    pub fn rgb8(self, what: &str) -> Result<image::RgbImage> {
        if self.channels != 3 {
            bail!(
                "{what} has {} channels: expected an RGB image",
                self.channels
            );
        }
        let (w, h) = (self.width as u32, self.height as u32);
        image::RgbImage::from_raw(w, h, self.data)
            .ok_or_else(|| anyhow::anyhow!("{what}: {w}x{h} RGB does not match its bytes"))
    }

    /// A scorer mask of a one-channel image (white = subject), as the CLI reads a gray mask file.
    pub fn mask(&self, what: &str) -> Result<Mask> {
        Ok(Mask::from_tensor(&self.gray(what)?))
    }
}
