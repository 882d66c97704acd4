//! `toffee embed`: images in, the image encoder's pixel_values and outputs out (one row per image,
//! in argument order).

use crate::forward::vit_outputs;
use crate::image_proc::load_rgb8_on_white as load_rgb8;
use crate::models::load::open_device;
use crate::pipeline::score::ImageEncoder;
use crate::tensor::Tensor;
use anyhow::{bail, Result};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// An image-encoder folder (with its preprocessor_config.json), a CLIPModel folder or a
    /// pipeline with an image_encoder.
    #[arg(long)]
    pub model: PathBuf,
    /// PNG / JPEG files.
    #[arg(long, num_args = 1.., required = true)]
    pub images: Vec<PathBuf>,
    /// safetensors file to write (atomically).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn run(a: Args) -> Result<()> {
    let names = embed_files(&a)?;
    eprintln!("wrote {} ({})", a.out.display(), names.join(", "));
    Ok(())
}

/// Returns the names written.
pub fn embed_files(o: &Args) -> Result<Vec<String>> {
    if o.images.is_empty() {
        bail!("--images: give at least one image");
    }
    crate::generate::check_writable(std::slice::from_ref(&o.out))?;
    let dev = open_device(&o.device, Some(&o.model), "")?;
    let enc = ImageEncoder::load(&o.model, &dev)?;
    let imgs = o
        .images
        .iter()
        .map(|p| load_rgb8(p))
        .collect::<Result<Vec<_>>>()?;
    let outputs = embed(&enc, &imgs)?;
    crate::weights::safetensors::write_f32(&o.out, &outputs)?;
    Ok(outputs.into_iter().map(|(n, _)| n).collect())
}

/// pixel_values (NCHW) and the encoder's outputs for `imgs`, on the host.
pub fn embed(enc: &ImageEncoder, imgs: &[image::RgbImage]) -> Result<Vec<(String, Tensor)>> {
    let (h, w) = enc.processor.output_size();
    enc.model.check_memory(imgs.len(), h, w)?;
    let pixels = enc.pixel_values(imgs);
    let out = enc.encode_pixels(&pixels);
    enc.model.device().check()?;
    let mut v = vec![("pixel_values".to_string(), pixels)];
    for (n, t) in vit_outputs(out) {
        v.push((n, t.to_host()?));
    }
    Ok(v)
}
