//! `toffee._toffee.ViewGenerator`: Zero123 novel views as `toffee view` renders them: the CLI's
//! loading (`ViewGenerator::load`), pose rules (`cmd::view::poses`), subject preparation
//! (`cmd::view::prepare_subject` for files) and `run_batches`, returned as 8-bit pixels.

use crate::pixels::{Pixels, RawImage};
use crate::py_result;
use anyhow::{bail, Result};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::path::PathBuf;
use toffee::cmd::view::{poses, prepare_subject};
use toffee::image_io;
use toffee::models::load::open_device;
use toffee::pipeline::request::{Naming, Settings};
use toffee::pipeline::view::{View, ViewGenerator as Inner, ViewRequest};
use toffee::tensor::Tensor;

#[pyclass(frozen, module = "toffee._toffee")]
pub struct ViewGenerator {
    gen: Inner,
}

/// The subject (and optional mask) as Python passes it: both files, or pixels.
#[derive(FromPyObject)]
pub enum SubjectArg<'py> {
    Files(PathBuf, Option<PathBuf>),
    Pixels(RawImage<'py>, Option<RawImage<'py>>),
}

enum Subject {
    Files(PathBuf, Option<PathBuf>),
    Pixels(Pixels, Option<Pixels>),
}

impl Subject {
    fn read(arg: &SubjectArg<'_>) -> Result<Subject> {
        Ok(match arg {
            SubjectArg::Files(i, m) => Subject::Files(i.clone(), m.clone()),
            SubjectArg::Pixels(i, m) => Subject::Pixels(
                Pixels::read(i, "image")?,
                m.as_ref().map(|m| Pixels::read(m, "mask")).transpose()?,
            ),
        })
    }

    /// [1, size, size, 3] on the 8-bit grid. Files: the CLI's own preparation. Pixels: RGB (an
    /// RGBA subject without a mask arrives composited on white, as the CLI composites a file's
    /// alpha), on white outside the mask, then the same fit and rounding as
    /// `cmd::view::prepare_subject` (which reads files only).
    fn prepare(self, size: usize) -> Result<Tensor> {
        let (image, mask) = match self {
            Subject::Files(i, m) => return prepare_subject(&i, m.as_deref(), size),
            Subject::Pixels(i, m) => (i, m),
        };
        let rgb = image.rgb("image")?;
        let (_, h, w, _) = rgb.dims4();
        let on_white = match mask {
            Some(m) => {
                let m = m.gray("mask")?;
                let (_, mh, mw, _) = m.dims4();
                if (mh, mw) != (h, w) {
                    bail!("the mask is {mw}x{mh} but the image is {w}x{h}");
                }
                image_io::on_white(&rgb, &m)
            }
            None => rgb,
        };
        let fitted = if (h, w) == (size, size) {
            on_white
        } else {
            image_io::fit(&on_white, size, size)
        };
        let grid = fitted.data().iter();
        let grid = grid.map(|v| (v.clamp(0.0, 1.0) * 255.0).round() / 255.0);
        Ok(Tensor::new(fitted.shape().to_vec(), grid.collect()))
    }
}

/// The numbers of one call (`toffee view`'s flags).
struct Numbers {
    elevation: Vec<f32>,
    azimuth: Vec<f32>,
    radius: Vec<f32>,
    steps: usize,
    guidance: f32,
    scheduler: Option<String>,
    seed: u64,
    batch: usize,
}

/// The views' 8-bit pixels [N, S, S, 3] and (N, S).
fn render(gen: &Inner, subject: Subject, n: Numbers) -> Result<(Vec<u8>, usize, usize)> {
    let poses = poses(&n.elevation, &n.azimuth, &n.radius)?;
    let scheduler = n.scheduler.as_deref().map(str::parse).transpose()?;
    Settings {
        batch: n.batch,
        scheduler,
        ..Settings::txt2img(n.steps, n.guidance, n.seed)
    }
    .check(Naming::Fields)?;
    let size = gen.default_size;
    let req = ViewRequest {
        subjects: vec![subject.prepare(size)?],
        views: poses
            .into_iter()
            .map(|pose| View { subject: 0, pose })
            .collect(),
        steps: n.steps,
        guidance: n.guidance,
        scheduler,
        seed: n.seed,
        batch: n.batch,
    };
    let mut pixels = Vec::new();
    gen.run_batches(&req, &mut |_, _| {}, &mut |_, _, images| {
        pixels.extend(image_io::to_u8(&images));
        Ok(())
    })?;
    Ok((pixels, req.views.len(), size))
}

#[pymethods]
impl ViewGenerator {
    /// A Zero1to3 pipeline folder on `device` (as `toffee view --model`).
    #[new]
    #[pyo3(signature = (model, device="cpu".to_string()))]
    fn new(py: Python<'_>, model: PathBuf, device: String) -> PyResult<ViewGenerator> {
        let loaded = py.detach(|| {
            let dev = open_device(&device, Some(&model), "unet")?;
            Inner::load(&model, &dev)
        });
        Ok(ViewGenerator {
            gen: py_result(loaded)?,
        })
    }

    /// The views of `subject` ((image, mask) paths or pixels), one per pose. Returns
    /// (bytes of [N, S, S, 3] uint8, N, S).
    #[pyo3(signature = (
        subject, *, elevation, azimuth, radius=vec![0.0], steps=50, guidance=3.0,
        scheduler=None, seed=0, batch=4
    ))]
    #[allow(clippy::too_many_arguments)]
    fn view<'py>(
        &self,
        py: Python<'py>,
        subject: SubjectArg<'py>,
        elevation: Vec<f32>,
        azimuth: Vec<f32>,
        radius: Vec<f32>,
        steps: usize,
        guidance: f32,
        scheduler: Option<String>,
        seed: u64,
        batch: usize,
    ) -> PyResult<(Bound<'py, PyBytes>, usize, usize)> {
        let subject = py_result(Subject::read(&subject))?;
        let numbers = Numbers {
            elevation,
            azimuth,
            radius,
            steps,
            guidance,
            scheduler,
            seed,
            batch,
        };
        let gen = &self.gen;
        let (bytes, n, size) = py_result(py.detach(|| render(gen, subject, numbers)))?;
        Ok((PyBytes::new(py, &bytes), n, size))
    }

    /// The side of the square views.
    #[getter]
    fn size(&self) -> usize {
        self.gen.default_size
    }
}
