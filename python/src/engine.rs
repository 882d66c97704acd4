//! `toffee.Engine`: a generator loaded once (a diffusers folder, or the CLI's built-in demo model,
//! with LoRAs, a ControlNet and image-prompt adapters) and its txt2img / img2img / inpaint calls.
//! Loading is the library's (`generate::load_generator`, `image_prompt::attach_adapters`: the
//! CLI's, and the C ABI's for adapters), requests go
//! through `pipeline::request::build` (the rules every entry point shares) and `Generator::run`,
//! and the images come back with the CLI's 8-bit rule (`image_io::to_u8`), so an array holds the
//! pixels `toffee txt2img` writes to its PNG.

use crate::pixels::{Pixels, RawImage};
use crate::py_result;
use crate::source::{ImageArg, Source};
use anyhow::{bail, Result};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::path::PathBuf;
use toffee::pipeline::image_prompt;
use toffee::pipeline::request::{self, Mode, Naming, Settings, Spec, MAX_SIDE};
use toffee::pipeline::score::ImageEncoder;
use toffee::pipeline::Generator;
use toffee::pipeline::ImagePrompt;
use toffee::weights::lora::LoraSpec;

/// The most pixels one call returns (all its images are held at once, as floats and as bytes):
/// one 16384² image, the C ABI's bound per call.
const MAX_PIXELS_PER_CALL: usize = MAX_SIDE * MAX_SIDE;

#[pyclass(frozen, module = "toffee._toffee")]
pub struct Engine {
    gen: Generator,
    /// The image encoder of each attached adapter (`gen.adapters`, same order).
    encoders: Vec<ImageEncoder>,
}

/// `FILE[:WEIGHT]` strings, parsed as the CLI parses `--lora`.
fn parse_loras(lora: &[String]) -> Result<Vec<LoraSpec>> {
    lora.iter().map(|s| s.parse()).collect()
}

fn parse_mode(mode: &str) -> Result<Mode> {
    Ok(match mode {
        "txt2img" => Mode::Txt2Img,
        "img2img" => Mode::Img2Img,
        "inpaint" => Mode::Inpaint,
        m => bail!("mode `{m}` is not txt2img, img2img or inpaint"),
    })
}

/// The numbers of one call, in `request::Settings` (checked by `request::build`).
struct Numbers {
    mode: Mode,
    seed: u64,
    steps: usize,
    width: Option<usize>,
    height: Option<usize>,
    guidance: f32,
    num_images: usize,
    batch: usize,
    scheduler: Option<String>,
    strength: Option<f64>,
    control_scale: f32,
    canny: bool,
}

impl Numbers {
    fn settings(&self) -> Result<Settings> {
        let scheduler = self.scheduler.as_deref().map(str::parse).transpose()?;
        Ok(Settings {
            mode: self.mode,
            images_per_prompt: self.num_images,
            batch: self.batch,
            width: self.width,
            height: self.height,
            scheduler,
            strength: self.strength,
            control_scale: self.control_scale,
            canny: self.canny,
            ..Settings::txt2img(self.steps, self.guidance, self.seed)
        })
    }
}

/// The host images of one call, read from Python's tuples while the GIL is held.
struct Inputs {
    image: Option<Pixels>,
    mask: Option<Pixels>,
    control: Option<Pixels>,
}

/// The request's `Spec`: the settings, the one prompt, and the images as the CLI's loaders
/// would give them for files holding the same pixels.
fn spec(
    numbers: &Numbers,
    prompt: String,
    negative: Option<String>,
    inputs: &Inputs,
) -> Result<Spec> {
    let mut spec = Spec::new(numbers.settings()?, vec![prompt], Naming::Fields);
    spec.negative = negative;
    if let Some(img) = &inputs.image {
        let (rgb, alpha) = img.rgb_and_alpha("image")?;
        spec.image = Some(rgb);
        spec.alpha = alpha;
    }
    spec.mask = inputs.mask.as_ref().map(|m| m.gray("mask")).transpose()?;
    spec.control = inputs
        .control
        .as_ref()
        .map(|c| c.rgb("control_image"))
        .transpose()?;
    Ok(spec)
}

/// Each adapter's condition for its subject image, by the library's rules
/// (`image_prompt::adapter_prompts`, the CLI's and the C ABI's).
fn adapter_prompts(
    gen: &Generator,
    encoders: &[ImageEncoder],
    images: Vec<Source>,
    scales: &[f32],
) -> Result<Vec<ImagePrompt>> {
    image_prompt::check_adapter_inputs(encoders.len(), images.len(), scales, Naming::Fields)?;
    let rgb = images
        .into_iter()
        .enumerate()
        .map(|(i, img)| img.rgb8(&format!("adapter_image[{i}]")))
        .collect::<Result<Vec<_>>>()?;
    image_prompt::adapter_prompts(gen, encoders, &rgb, scales, Naming::Fields)
}

/// Refuses a call whose images together would be more than `MAX_PIXELS_PER_CALL`, before
/// sampling allocates them.
fn check_output_size(req: &toffee::pipeline::Request) -> Result<()> {
    let n = req.total_images();
    let fits = n
        .checked_mul(req.width)
        .and_then(|p| p.checked_mul(req.height))
        .is_some_and(|p| p <= MAX_PIXELS_PER_CALL);
    if !fits {
        bail!(
            "num_images {n} × width {} × height {} is more than the {MAX_PIXELS_PER_CALL} pixels one call returns",
            req.width,
            req.height
        );
    }
    Ok(())
}

/// The 8-bit pixels `[N, H, W, 3]` of the request's images and their (N, H, W).
fn generate(
    engine: &Engine,
    mut spec: Spec,
    adapter_images: Vec<Source>,
    adapter_scales: &[f32],
) -> Result<(Vec<u8>, usize, usize, usize)> {
    let gen = &engine.gen;
    spec.image_prompts = adapter_prompts(gen, &engine.encoders, adapter_images, adapter_scales)?;
    let req = request::build(gen, spec)?;
    check_output_size(&req)?;
    let images = gen.run(&req, &mut |_, _| {})?.images;
    let (n, h, w, _) = images.dims4();
    Ok((toffee::image_io::to_u8(&images), n, h, w))
}

#[pymethods]
impl Engine {
    /// Loads a diffusers pipeline folder (`model`), or the built-in demo model when `model` is
    /// None, on `device` (cpu, cuda, cuda:N, emu where built with it).
    #[new]
    #[pyo3(signature = (
        model=None, device="cpu".to_string(), controlnet=None, lora=Vec::new(),
        adapter=Vec::new(), adapter_encoder=Vec::new()
    ))]
    fn new(
        py: Python<'_>,
        model: Option<PathBuf>,
        device: String,
        controlnet: Option<PathBuf>,
        lora: Vec<String>,
        adapter: Vec<PathBuf>,
        adapter_encoder: Vec<PathBuf>,
    ) -> PyResult<Engine> {
        let loaded = py.detach(|| {
            let loras = parse_loras(&lora)?;
            if model.is_none() && !adapter.is_empty() {
                bail!("adapter needs model (the built-in demo model takes no adapter)");
            }
            if adapter.is_empty() && !adapter_encoder.is_empty() {
                bail!("adapter_encoder needs adapter");
            }
            let mut gen = toffee::generate::load_generator(
                model.as_deref(),
                &device,
                controlnet.as_deref(),
                &loras,
                Naming::Fields,
            )?;
            let encoders = image_prompt::attach_adapters(
                &mut gen,
                &adapter,
                &adapter_encoder,
                Naming::Fields,
            )?;
            Ok(Engine { gen, encoders })
        });
        py_result(loaded)
    }

    /// One generation call; python/toffee's `txt2img`, `img2img` and `inpaint` name the mode.
    /// Returns (bytes of [N, H, W, 3] uint8, N, H, W).
    #[pyo3(signature = (
        mode, prompt, *, seed=0, steps=20, width=None, height=None, guidance=7.5,
        negative_prompt=None, num_images=1, batch=1, scheduler=None, strength=None,
        image=None, mask=None, control_image=None, control_scale=1.0, canny=false,
        adapter_image=Vec::new(), adapter_scale=Vec::new()
    ))]
    #[allow(clippy::too_many_arguments)]
    fn generate<'py>(
        &self,
        py: Python<'py>,
        mode: &str,
        prompt: String,
        seed: u64,
        steps: usize,
        width: Option<usize>,
        height: Option<usize>,
        guidance: f32,
        negative_prompt: Option<String>,
        num_images: usize,
        batch: usize,
        scheduler: Option<String>,
        strength: Option<f64>,
        image: Option<RawImage<'py>>,
        mask: Option<RawImage<'py>>,
        control_image: Option<RawImage<'py>>,
        control_scale: f32,
        canny: bool,
        adapter_image: Vec<ImageArg<'py>>,
        adapter_scale: Vec<f32>,
    ) -> PyResult<(Bound<'py, PyBytes>, usize, usize, usize)> {
        let numbers = Numbers {
            mode: py_result(parse_mode(mode))?,
            seed,
            steps,
            width,
            height,
            guidance,
            num_images,
            batch,
            scheduler,
            strength,
            control_scale,
            canny,
        };
        let read = |raw: &Option<RawImage<'py>>, what| {
            raw.as_ref().map(|r| Pixels::read(r, what)).transpose()
        };
        let inputs = Inputs {
            image: py_result(read(&image, "image"))?,
            mask: py_result(read(&mask, "mask"))?,
            control: py_result(read(&control_image, "control_image"))?,
        };
        let adapter_images = adapter_image
            .iter()
            .enumerate()
            .map(|(i, a)| Source::read(a, &format!("adapter_image[{i}]")))
            .collect::<Result<Vec<_>>>();
        let adapter_images = py_result(adapter_images)?;
        let (bytes, n, h, w) = py_result(py.detach(|| {
            let spec = spec(&numbers, prompt, negative_prompt, &inputs)?;
            generate(self, spec, adapter_images, &adapter_scale)
        }))?;
        Ok((PyBytes::new(py, &bytes), n, h, w))
    }

    /// The model's default output side (used when width and height are not given).
    #[getter]
    fn default_size(&self) -> usize {
        self.gen.default_size
    }
}
