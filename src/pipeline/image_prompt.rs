//! From a subject image to an adapter's image condition: the adapter's image encoder, which of
//! its outputs the adapter reads, and the unconditional side of guidance as diffusers makes it.
//!
//! - IP-Adapter: the CLIP `image_embeds`; negative = zeros (diffusers).
//! - IP-Adapter-Plus: `penultimate_hidden_state`; negative = the encoder on an all-zero
//!   `pixel_values` tensor (diffusers).
//! - Toffee adapter: the DINO output and tokens `adapter_config.json` names; negative = zero
//!   tokens (docs/models.md).
//!
//! The encoder is found next to the adapter: `--adapter-encoder DIR` when given; a Toffee
//! adapter's `image_encoder` (a path, relative to its folder); or the `image_encoder/` folder
//! beside an IP-Adapter file or one level up (h94/IP-Adapter's `models/` layout).

use super::request::Naming;
use super::score::ImageEncoder;
use super::{Generator, ImagePrompt};
use crate::backend::Device;
use crate::models::adapter::{Adapter, AdapterKind};
use crate::tensor::Tensor;
use anyhow::{bail, Result};
use image::RgbImage;
use std::path::{Path, PathBuf};

/// Loads each adapter (an IP-Adapter file or a Toffee adapter folder) onto `gen`'s UNet with its
/// image encoder (`encoders[i]`, else found beside it: none or one per adapter). Returns the
/// encoders in `gen.adapters`' order. The CLI, the C ABI and the Python engine all attach
/// adapters through this.
pub fn attach_adapters(
    gen: &mut Generator,
    adapters: &[PathBuf],
    encoders: &[PathBuf],
    naming: Naming,
) -> Result<Vec<ImageEncoder>> {
    let n = adapters.len();
    if !encoders.is_empty() && encoders.len() != n {
        bail!(
            "{}: give none or one per adapter ({n})",
            naming.name("adapter_encoder")
        );
    }
    let mut loaded = Vec::with_capacity(n);
    for (i, path) in adapters.iter().enumerate() {
        let adapter = Adapter::load(path, &gen.device)?;
        let given = encoders.get(i).map(PathBuf::as_path);
        loaded.push(load_encoder(&adapter, given, &gen.device)?);
        gen.attach_adapter(adapter)?;
    }
    Ok(loaded)
}

/// `images` subject images and `scales` for `n` adapters: one image each, in the same order;
/// one scale for all, one each, or none; finite. (Callers that read the images from files check
/// this before loading anything.)
pub fn check_adapter_inputs(n: usize, images: usize, scales: &[f32], naming: Naming) -> Result<()> {
    if images != n {
        bail!(
            "{n} adapter(s) but {images} {}: give each adapter its subject image, in the same order",
            naming.name("adapter_image")
        );
    }
    let scale_name = naming.name("adapter_scale");
    if scales.len() > 1 && scales.len() != n {
        bail!("{scale_name}: give one for all adapters or one per adapter ({n})");
    }
    if let Some(bad) = scales.iter().find(|v| !v.is_finite()) {
        bail!("{scale_name} {bad} is not a finite number");
    }
    Ok(())
}

/// The condition of each of `gen`'s adapters (`encoders` from `attach_adapters`) for its subject
/// image: one image per adapter, in the same order; `scales` one for all, one each, or none
/// (each adapter's own default), finite.
pub fn adapter_prompts(
    gen: &Generator,
    encoders: &[ImageEncoder],
    images: &[RgbImage],
    scales: &[f32],
    naming: Naming,
) -> Result<Vec<ImagePrompt>> {
    let n = encoders.len();
    check_adapter_inputs(n, images.len(), scales, naming)?;
    let layers = gen.unet.cross_attention_layers();
    (0..n)
        .map(|i| {
            let adapter = &gen.adapters[i];
            let scale = match scales.len() {
                0 => adapter.default_scale,
                1 => scales[0],
                _ => scales[i],
            };
            image_prompt(adapter, &encoders[i], &images[i], scale, layers)
        })
        .collect()
}

/// Where the adapter's image encoder is (see the module comment).
pub fn encoder_dir(adapter: &Adapter, given: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    let src = &adapter.source;
    let mut candidates = Vec::new();
    if let (Some(e), Some(dir)) = (&adapter.image_encoder, src.parent()) {
        candidates.push(dir.join(e));
    }
    // h94/IP-Adapter's SDXL `*_vit-h` files read the ViT-H encoder of the SD 1.5 files
    // (`models/image_encoder`), not the ViT-bigG beside them in `sdxl_models/`.
    let vit_h = src
        .file_stem()
        .is_some_and(|s| s.to_string_lossy().ends_with("_vit-h"));
    if let (true, Some(root)) = (vit_h, src.parent().and_then(Path::parent)) {
        candidates.push(root.join("models").join("image_encoder"));
    }
    for up in src.ancestors().skip(1).take(2) {
        candidates.push(up.join("image_encoder"));
    }
    match candidates.iter().find(|c| c.join("config.json").is_file()) {
        Some(c) => Ok(c.clone()),
        None => bail!(
            "{}: no image encoder found (looked in {}); give --adapter-encoder DIR",
            src.display(),
            candidates
                .iter()
                .map(|c| c.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The adapter's image encoder, loaded.
pub fn load_encoder(
    adapter: &Adapter,
    given: Option<&Path>,
    device: &Device,
) -> Result<ImageEncoder> {
    let dir = encoder_dir(adapter, given)?;
    let enc = ImageEncoder::load_with(&dir, device, adapter.kind != AdapterKind::Toffee)?;
    Ok(enc)
}

/// What `adapter` takes from the encoder for `pixel_values` [1, 3, H, W] (host), on the host.
fn features(adapter: &Adapter, enc: &ImageEncoder, pixel_values: &Tensor) -> Result<Tensor> {
    let out = enc.encode_pixels(pixel_values);
    let t = match adapter.kind {
        AdapterKind::Plain => match out.image_embeds {
            Some(e) => e,
            None => bail!(
                "{}: IP-Adapter needs a projected CLIP image encoder (CLIPVisionModelWithProjection); {} has no visual_projection",
                adapter.source.display(),
                enc.dir.display()
            ),
        },
        AdapterKind::Plus => out.penultimate_hidden_state,
        AdapterKind::Toffee => {
            let sel = adapter.selection.as_ref().expect("Toffee adapters select tokens");
            let x = if sel.output == "penultimate_hidden_state" {
                out.penultimate_hidden_state
            } else {
                out.last_hidden_state
            };
            if sel.patch_only {
                let (b, t, d) = (x.shape()[0], x.shape()[1], x.shape()[2]);
                if sel.prefix >= t {
                    bail!(
                        "{}: num_prefix_tokens {} leaves no patch tokens of {t}",
                        adapter.source.display(),
                        sel.prefix
                    );
                }
                crate::backend::slice_channels(&x.reshape(vec![b, t * d]), sel.prefix * d, (t - sel.prefix) * d)
                    .reshape(vec![b, t - sel.prefix, d])
            } else {
                x
            }
        }
    };
    enc.model.device().check()?;
    let t = t.to_host()?;
    if t.last_dim() != adapter.image_embed_dim {
        bail!(
            "{}: the adapter takes {}-wide image features, the encoder {} gives {}",
            adapter.source.display(),
            adapter.image_embed_dim,
            enc.dir.display(),
            t.last_dim()
        );
    }
    Ok(t)
}

/// The image condition of `adapter` for `image` (one subject for every image of a request), with
/// λ = `scale` on every one of the UNet's `layers` cross-attention layers.
pub fn image_prompt(
    adapter: &Adapter,
    enc: &ImageEncoder,
    image: &RgbImage,
    scale: f32,
    layers: usize,
) -> Result<ImagePrompt> {
    image_prompts(adapter, enc, std::slice::from_ref(image), scale, layers)
}

/// One row per image: the condition of a batch whose images each have their own subject (the
/// pairs job), encoded in one encoder call.
pub fn image_prompts(
    adapter: &Adapter,
    enc: &ImageEncoder,
    images: &[RgbImage],
    scale: f32,
    layers: usize,
) -> Result<ImagePrompt> {
    let px = enc.pixel_values(images);
    let positive = features(adapter, enc, &px)?;
    let negative = match adapter.kind {
        AdapterKind::Plus => features(adapter, enc, &Tensor::zeros(px.shape().to_vec()))?,
        AdapterKind::Plain | AdapterKind::Toffee => Tensor::zeros(positive.shape().to_vec()),
    };
    Ok(ImagePrompt {
        positive,
        negative,
        scales: vec![scale; layers],
    })
}
