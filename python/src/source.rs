//! An image argument that is either a file (read later by the CLI's own loaders, so a path gives
//! exactly the CLI's pixels) or raw pixels from python/toffee (`pixels::Pixels`).

use crate::pixels::{Pixels, RawImage};
use anyhow::Result;
use pyo3::prelude::*;
use std::path::PathBuf;
use toffee::image_io::load_mask;
use toffee::image_proc::load_rgb8_on_white;
use toffee::pipeline::score::Mask;

/// An image argument as Python passes it: a path, or the package's raw pixel tuple.
#[derive(FromPyObject)]
pub enum ImageArg<'py> {
    Path(PathBuf),
    Raw(RawImage<'py>),
}

/// An image argument copied out of Python (while the GIL is held), decoded later without it.
pub enum Source {
    File(PathBuf),
    Pixels(Pixels),
}

impl Source {
    pub fn read(arg: &ImageArg<'_>, what: &str) -> Result<Source> {
        Ok(match arg {
            ImageArg::Path(p) => Source::File(p.clone()),
            ImageArg::Raw(r) => Source::Pixels(Pixels::read(r, what)?),
        })
    }

    /// The RGB image the encoders see: a file as `toffee score` / `embed` / `--adapter-image`
    /// read it (alpha composited on white), pixels as given (python/toffee composites RGBA
    /// with the same rule first).
    pub fn rgb8(self, what: &str) -> Result<image::RgbImage> {
        match self {
            Source::File(p) => load_rgb8_on_white(&p),
            Source::Pixels(px) => px.rgb8(what),
        }
    }

    pub fn mask(self, what: &str) -> Result<Mask> {
        match self {
            Source::File(p) => Ok(Mask::from_tensor(&load_mask(&p)?)),
            Source::Pixels(px) => px.mask(what),
        }
    }

    /// The name errors give an image: its path, else `what`.
    pub fn name(&self, what: &str) -> String {
        match self {
            Source::File(p) => p.display().to_string(),
            Source::Pixels(_) => what.to_string(),
        }
    }
}
