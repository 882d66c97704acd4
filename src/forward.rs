//! `toffee forward`: one model on named tensors in diffusers' NCHW layout, so users can check a
//! checkpoint against their own PyTorch outputs.

use crate::backend::Device;
use crate::budget;
use crate::models::clipseg::ClipSeg;
use crate::models::load;
use crate::models::unet::Cond;
use crate::tensor::Tensor;
use anyhow::{bail, Result};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Component {
    Unet,
    Controlnet,
    VaeEncode,
    VaeDecode,
    TextEncoder,
    /// SDXL's second text encoder (the pipeline's text_encoder_2 folder).
    #[value(name = "text-encoder-2")]
    TextEncoder2,
    /// ViT / DINOv2 / CLIP vision (a pipeline's image_encoder folder, or a model folder).
    ImageEncoder,
    /// Depth Anything (`DepthAnythingForDepthEstimation` folder): pixel_values -> predicted_depth.
    Depth,
    /// Segment Anything (transformers `SamModel` folder): image + box / point prompts -> masks.
    Sam,
    /// CLIPSegForImageSegmentation (a model folder): input_ids + pixel_values -> logits.
    Clipseg,
}

impl Component {
    /// The name the CLI uses.
    pub fn name(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::Controlnet => "controlnet",
            Component::VaeEncode => "vae-encode",
            Component::VaeDecode => "vae-decode",
            Component::TextEncoder => "text-encoder",
            Component::TextEncoder2 => "text-encoder-2",
            Component::ImageEncoder => "image-encoder",
            Component::Depth => "depth",
            Component::Sam => "sam",
            Component::Clipseg => "clipseg",
        }
    }

    /// The pipeline subfolder holding this component.
    pub fn subfolder(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::Controlnet => "controlnet",
            Component::VaeEncode | Component::VaeDecode => "vae",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
            Component::ImageEncoder => "image_encoder",
            Component::Depth => "depth",
            Component::Sam => "sam",
            Component::Clipseg => "clipseg",
        }
    }
}

pub type Named = BTreeMap<String, Tensor>;

/// The largest image side in pixels, as the pipeline allows (`request::MAX_SIDE`).
const MAX_SIDE: usize = crate::pipeline::request::MAX_SIDE;
/// The largest latent side: the pipeline's largest image over the VAE's factor 8.
const MAX_LATENT_SIDE: usize = MAX_SIDE / 8;
/// The largest batch, as the pipeline allows for `batch`.
const MAX_BATCH: usize = 4096;
/// The most tokens one sample may carry into attention (text or image-prompt sequences, image
/// encoder patches): attention holds a tokens² score matrix per head, 1 GiB at this length.
const MAX_TOKENS: usize = 16_384;

impl Component {
    /// The inputs the component reads (`.{i}` marks an indexed family), for `adapters`
    /// image-prompt adapters on the UNet: anything else would be silently ignored.
    fn accepted(self, adapters: usize) -> Vec<String> {
        let names: &[&str] = match self {
            Component::Unet if adapters > 0 => &[
                "sample",
                "timestep",
                "encoder_hidden_states",
                "text_embeds",
                "time_ids",
            ],
            Component::Unet => &[
                "sample",
                "timestep",
                "encoder_hidden_states",
                "text_embeds",
                "time_ids",
                "down_res.{i}",
                "mid_res",
            ],
            Component::Controlnet => &[
                "sample",
                "timestep",
                "encoder_hidden_states",
                "controlnet_cond",
                "conditioning_scale",
                "text_embeds",
                "time_ids",
            ],
            Component::VaeEncode => &["image"],
            Component::VaeDecode => &["latent"],
            Component::TextEncoder | Component::TextEncoder2 => &["input_ids"],
            Component::ImageEncoder => &["pixel_values", "interpolate_pos_encoding"],
            Component::Depth => &["pixel_values"],
            Component::Sam => &[
                "pixel_values",
                "input_boxes",
                "input_points",
                "input_labels",
                "multimask_output",
            ],
            Component::Clipseg => &["input_ids", "pixel_values"],
        };
        let mut v: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        for base in ["ip_image_embeds", "ip_scale", "ip_layer_scales"] {
            v.extend((0..adapters).map(|i| format!("{base}.{i}")));
            if adapters == 1 {
                v.push(base.to_string());
            }
        }
        v
    }
}

/// Whether `name` is one of `accepted` (where `base.{i}` stands for `base.0`, `base.1`, …).
fn is_accepted(name: &str, accepted: &[String]) -> bool {
    accepted.iter().any(|a| match a.strip_suffix(".{i}") {
        Some(base) => name
            .strip_prefix(base)
            .and_then(|r| r.strip_prefix('.'))
            .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit())),
        None => a == name,
    })
}

/// An input the component does not read is an error: a misspelt name would otherwise run the
/// model without it and compare wrong outputs.
fn check_names(component: Component, adapters: usize, inputs: &Named, file: &Path) -> Result<()> {
    let accepted = component.accepted(adapters);
    if let Some(name) = inputs.keys().find(|n| !is_accepted(n, &accepted)) {
        let with = match adapters {
            0 => String::new(),
            n => format!(" with {n} --adapter"),
        };
        bail!(
            "{}: input `{name}` is not an input of --component {}{with} (it takes: {})",
            file.display(),
            component.name(),
            accepted.join(", ")
        );
    }
    Ok(())
}

/// Sizes no model run can take, refused before anything is allocated (a failed allocation
/// aborts the process): batches past `MAX_BATCH`, image and latent sides past the pipeline's
/// limits, token sequences past `MAX_TOKENS`.
fn check_sizes(inputs: &Named, file: &Path) -> Result<()> {
    for (name, t) in inputs {
        let s = t.shape();
        let too_big = |what: &str, v: usize, max: usize| {
            anyhow::anyhow!(
                "{}: input `{name}` (shape {s:?}) has {what} {v}, more than the {max} allowed",
                file.display()
            )
        };
        if s.len() >= 2 && s[0] > MAX_BATCH {
            return Err(too_big("a batch of", s[0], MAX_BATCH));
        }
        let side = match name.as_str() {
            "image" | "controlnet_cond" | "pixel_values" => Some(MAX_SIDE),
            "sample" | "latent" | "mid_res" => Some(MAX_LATENT_SIDE),
            n if n.starts_with("down_res.") => Some(MAX_LATENT_SIDE),
            _ => None,
        };
        if let (Some(max), 4) = (side, s.len()) {
            if let Some(&v) = s[2..].iter().find(|&&v| v > max) {
                return Err(too_big("a side of", v, max));
            }
        }
        let sequence = name == "encoder_hidden_states" || name.starts_with("ip_image_embeds");
        if sequence && s.len() >= 3 {
            let tokens: usize = s[1..s.len() - 1].iter().product();
            if tokens > MAX_TOKENS {
                return Err(too_big("a sequence of", tokens, MAX_TOKENS));
            }
        }
    }
    Ok(())
}

/// Image-encoder inputs past `MAX_TOKENS` patches, refused before the encoder runs.
fn check_patches(file: &Path, h: usize, w: usize, patch: usize) -> Result<()> {
    let tokens = (h / patch.max(1)) * (w / patch.max(1));
    if tokens > MAX_TOKENS {
        bail!(
            "{}: `pixel_values` {h}x{w} makes {tokens} {patch}-pixel patches, more than the \
             {MAX_TOKENS} allowed",
            file.display()
        );
    }
    Ok(())
}

struct Inputs<'a> {
    map: &'a Named,
    file: &'a Path,
}

impl Inputs<'_> {
    fn require(&self, names: &[&str]) -> Result<()> {
        let missing: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| !self.map.contains_key(*n))
            .collect();
        if !missing.is_empty() {
            bail!(
                "{}: missing input tensor(s): {}",
                self.file.display(),
                missing.join(", ")
            );
        }
        Ok(())
    }
    fn get(&self, name: &str) -> Option<&Tensor> {
        self.map.get(name)
    }
    /// A rank-4 NCHW tensor, converted to NHWC.
    fn image(&self, name: &str) -> Result<Tensor> {
        self.require(&[name])?;
        let t = &self.map[name];
        if t.rank() != 4 {
            bail!(
                "{}: tensor `{name}` has shape {:?}; expected rank 4 (N, C, H, W)",
                self.file.display(),
                t.shape()
            );
        }
        Ok(t.to_nhwc())
    }
    fn rank(&self, name: &str, rank: usize, what: &str) -> Result<&Tensor> {
        self.require(&[name])?;
        let t = &self.map[name];
        if t.rank() != rank {
            bail!(
                "{}: tensor `{name}` has shape {:?}; expected {what}",
                self.file.display(),
                t.shape()
            );
        }
        Ok(t)
    }
    /// `input_ids` [N, tokens] as token ids (stored as integers; read as f32 by safetensors).
    fn ids(&self) -> Result<Vec<Vec<u32>>> {
        let ids_t = self.rank("input_ids", 2, "[N, tokens]")?;
        let (b, l) = (ids_t.shape()[0], ids_t.shape()[1]);
        let mut ids = Vec::with_capacity(b);
        for r in 0..b {
            let row = &ids_t.data()[r * l..(r + 1) * l];
            if let Some(bad) = row.iter().find(|v| **v < 0.0 || v.fract() != 0.0) {
                bail!(
                    "{}: `input_ids` holds {bad}, not a token id",
                    self.file.display()
                );
            }
            ids.push(row.iter().map(|v| *v as u32).collect::<Vec<u32>>());
        }
        Ok(ids)
    }
    /// One timestep per sample: a scalar or a 1-element tensor is broadcast.
    fn timesteps(&self, batch: usize) -> Result<Vec<f32>> {
        self.require(&["timestep"])?;
        let t = &self.map["timestep"];
        match t.numel() {
            1 => Ok(vec![t.data()[0]; batch]),
            n if n == batch && t.rank() == 1 => Ok(t.data().to_vec()),
            _ => bail!(
                "{}: tensor `timestep` has shape {:?}; expected a scalar or [{batch}]",
                self.file.display(),
                t.shape()
            ),
        }
    }
    fn text_time(&self) -> Result<Option<(Tensor, Tensor)>> {
        match (self.get("text_embeds"), self.get("time_ids")) {
            (None, None) => Ok(None),
            (Some(_), None) | (None, Some(_)) => bail!(
                "{}: `text_embeds` and `time_ids` go together; only one is present",
                self.file.display()
            ),
            (Some(_), Some(_)) => {
                let te = self.rank("text_embeds", 2, "[N, dim]")?.clone();
                let ti = self.rank("time_ids", 2, "[N, 6]")?.clone();
                Ok(Some((te, ti)))
            }
        }
    }
}

/// Runs `component` of the model at `model` on `inputs` (read from `inputs_file`, named in errors)
/// on `device`. Returns the outputs (on the host) in NCHW / token layouts, by name.
pub fn run(
    model: &Path,
    component: Component,
    inputs: &Named,
    inputs_file: &Path,
    device: &Device,
) -> Result<Vec<(String, Tensor)>> {
    run_with_adapters(model, component, inputs, inputs_file, device, &[])
}

/// `run` with image-prompt adapters attached to the UNet (`component` must be `unet`): inputs
/// `ip_image_embeds.{i}` (or `ip_image_embeds` for one adapter) as diffusers passes
/// `added_cond_kwargs["image_embeds"][i]`, and per adapter a scale `ip_scale.{i}` / `ip_scale`
/// (default 1) or one scale per cross-attention layer `ip_layer_scales.{i}`; outputs also
/// `ip_image_prompt_embeds.{i}` [B, images, tokens, dim].
pub fn run_with_adapters(
    model: &Path,
    component: Component,
    inputs: &Named,
    inputs_file: &Path,
    device: &Device,
    adapters: &[std::path::PathBuf],
) -> Result<Vec<(String, Tensor)>> {
    if !adapters.is_empty() && component != Component::Unet {
        bail!("--adapter works with --component unet only");
    }
    check_names(component, adapters.len(), inputs, inputs_file)?;
    check_sizes(inputs, inputs_file)?;
    // A NaN or infinity in an input only ever produces garbage downstream: refuse it by name.
    for (name, t) in inputs {
        if let Some(i) = t.data().iter().position(|v| !v.is_finite()) {
            bail!(
                "{}: input `{name}` holds a non-finite value ({}) at element {i}",
                inputs_file.display(),
                t.data()[i]
            );
        }
        if t.shape().contains(&0) {
            bail!(
                "{}: input `{name}` has an empty dimension (shape {:?})",
                inputs_file.display(),
                t.shape()
            );
        }
    }
    let out = if adapters.is_empty() {
        run_on(model, component, inputs, inputs_file, device)?
    } else {
        run_unet_adapters(model, inputs, inputs_file, device, adapters)?
    };
    device.check()?;
    out.into_iter()
        .map(|(n, t)| {
            let h = t.to_host()?;
            // Rank-4 outputs are NHWC images, except the [B, images, tokens, dim] adapter tokens.
            let image = h.rank() == 4 && !n.starts_with("ip_image_prompt_embeds");
            Ok((n, if image { h.to_nchw() } else { h }))
        })
        .collect()
}

fn run_on(
    model: &Path,
    component: Component,
    inputs: &Named,
    inputs_file: &Path,
    dev: &Device,
) -> Result<Vec<(String, Tensor)>> {
    let inp = Inputs {
        map: inputs,
        file: inputs_file,
    };
    match component {
        Component::Unet => run_unet(model, &inp, dev),
        Component::Controlnet => run_controlnet(model, &inp, dev),
        Component::VaeEncode => {
            let image = dev.put(inp.image("image")?);
            let vae = load::load_vae(model, dev)?;
            // The encoder's first level and mid attention match the decoder's last ones.
            let (n, h, w, _) = image.dims4();
            budget::check(vae.decode_floor(n, h, w), || {
                format!("{}: `image`", inp.file.display())
            })?;
            let (mean, logvar) = vae.encode(&image)?;
            Ok(vec![
                ("latent_mean".into(), mean),
                ("latent_logvar".into(), logvar),
            ])
        }
        Component::VaeDecode => {
            let latent = dev.put(inp.image("latent")?);
            let vae = load::load_vae(model, dev)?;
            let (n, lh, lw, _) = latent.dims4();
            let f = vae.downscale();
            let floor = vae.decode_floor(n, lh.saturating_mul(f), lw.saturating_mul(f));
            budget::check(floor, || format!("{}: `latent`", inp.file.display()))?;
            Ok(vec![("image".into(), vae.decode(&latent)?)])
        }
        Component::ImageEncoder => run_image_encoder(model, &inp, dev),
        Component::Depth => run_depth(model, &inp, dev),
        Component::Sam => run_sam(model, &inp, dev),
        Component::TextEncoder | Component::TextEncoder2 => {
            run_text_encoder(model, component, &inp, dev)
        }
        Component::Clipseg => run_clipseg(model, &inp, dev),
    }
}

/// The UNet's inputs on the device: sample, timesteps (f32), encoder_hidden_states and SDXL's
/// (text_embeds, time_ids).
type UnetInputs = (Tensor, Tensor, Tensor, Option<(Tensor, Tensor)>);

fn unet_inputs(inp: &Inputs, dev: &Device) -> Result<UnetInputs> {
    inp.require(&["sample", "timestep", "encoder_hidden_states"])?;
    let sample = dev.put(inp.image("sample")?);
    let b = sample.shape()[0];
    let ts = dev.put_f32(Tensor::new(vec![b], inp.timesteps(b)?));
    let ctx = dev.put(
        inp.rank("encoder_hidden_states", 3, "[N, tokens, dim]")?
            .clone(),
    );
    Ok((sample, ts, ctx, put_tt(dev, inp.text_time()?)))
}

/// SDXL's (text_embeds, time_ids) on the device; the time ids stay f32.
fn put_tt(dev: &Device, tt: Option<(Tensor, Tensor)>) -> Option<(Tensor, Tensor)> {
    tt.map(|(a, b)| (dev.put(a), dev.put_f32(b)))
}

/// `UNet2DConditionModel.forward`, with ControlNet residuals when the inputs hold them.
fn run_unet(model: &Path, inp: &Inputs, dev: &Device) -> Result<Vec<(String, Tensor)>> {
    let (sample, ts, ctx, tt) = unet_inputs(inp, dev)?;
    let unet = load::load_unet(model, dev)?;
    let (n, lh, lw, _) = sample.dims4();
    let floor = crate::pipeline::unet_floor(&unet.config, dev, n, (lh, lw));
    budget::check(floor, || format!("{}: `sample`", inp.file.display()))?;
    let residuals = controlnet_residuals(inp, dev)?;
    let cond = Cond {
        timesteps: &ts,
        context: &ctx,
        text_time: tt.as_ref().map(|(a, b)| (a, b)),
        ip: &[],
        timestep_cond: None,
    };
    let residuals = residuals.as_ref().map(|(d, m)| (d.as_slice(), m));
    let out = unet.forward(&sample, &cond, residuals, None)?;
    Ok(vec![("out".into(), out)])
}

/// `down_res.0`, `down_res.1`, … and `mid_res` on the device (NHWC): both or neither.
fn controlnet_residuals(inp: &Inputs, dev: &Device) -> Result<Option<(Vec<Tensor>, Tensor)>> {
    let mut down = Vec::new();
    while let Some(t) = inp.get(&format!("down_res.{}", down.len())) {
        if t.rank() != 4 {
            bail!(
                "{}: tensor `down_res.{}` has shape {:?}; expected rank 4",
                inp.file.display(),
                down.len(),
                t.shape()
            );
        }
        down.push(dev.put(t.to_nhwc()));
    }
    // `down_res.N` are read from 0 up to the first gap: one past a gap would be ignored.
    if let Some(stray) = inp
        .map
        .keys()
        .filter(|k| k.starts_with("down_res."))
        .nth(down.len())
    {
        bail!(
            "{}: input `{stray}` would be ignored: down_res.{} is missing (the residuals are \
             read from down_res.0 up to the first gap)",
            inp.file.display(),
            down.len()
        );
    }
    let mid = inp
        .get("mid_res")
        .map(|_| inp.image("mid_res"))
        .transpose()?
        .map(|m| dev.put(m));
    match (mid, down.is_empty()) {
        (None, true) => Ok(None),
        (Some(m), false) => Ok(Some((down, m))),
        _ => bail!(
            "{}: ControlNet residuals need both down_res.0… and mid_res",
            inp.file.display()
        ),
    }
}

/// `ControlNetModel.forward`: outputs `down_res.{i}` and `mid_res`.
fn run_controlnet(model: &Path, inp: &Inputs, dev: &Device) -> Result<Vec<(String, Tensor)>> {
    inp.require(&[
        "sample",
        "timestep",
        "encoder_hidden_states",
        "controlnet_cond",
    ])?;
    let sample = dev.put(inp.image("sample")?);
    let b = sample.shape()[0];
    let ts = dev.put_f32(Tensor::new(vec![b], inp.timesteps(b)?));
    let ctx = dev.put(
        inp.rank("encoder_hidden_states", 3, "[N, tokens, dim]")?
            .clone(),
    );
    let image = dev.put(inp.image("controlnet_cond")?);
    let scale = match inp.get("conditioning_scale") {
        None => 1.0,
        Some(t) if t.numel() == 1 => t.data()[0],
        Some(t) => bail!(
            "{}: `conditioning_scale` has shape {:?}; expected a scalar",
            inp.file.display(),
            t.shape()
        ),
    };
    let tt = put_tt(dev, inp.text_time()?);
    let cn = load::load_controlnet(model, dev)?;
    let (n, lh, lw, _) = sample.dims4();
    let floor = crate::pipeline::unet_floor(&cn.config, dev, n, (lh, lw));
    budget::check(floor, || format!("{}: `sample`", inp.file.display()))?;
    let cond = Cond {
        timesteps: &ts,
        context: &ctx,
        text_time: tt.as_ref().map(|(a, b)| (a, b)),
        ip: &[],
        timestep_cond: None,
    };
    let out = cn.forward(&sample, &cond, &image, scale)?;
    let mut v: Vec<(String, Tensor)> = out
        .down
        .into_iter()
        .enumerate()
        .map(|(i, t)| (format!("down_res.{i}"), t))
        .collect();
    v.push(("mid_res".into(), out.mid));
    Ok(v)
}

/// A ViT / DINOv2 / CLIP vision model on `pixel_values`, with an optional
/// `interpolate_pos_encoding` scalar.
fn run_image_encoder(model: &Path, inp: &Inputs, dev: &Device) -> Result<Vec<(String, Tensor)>> {
    let pixels = inp.image("pixel_values")?;
    let mut enc = load::load_image_encoder(model, dev)?;
    match inp.get("interpolate_pos_encoding") {
        None => {}
        Some(t) if t.numel() == 1 => enc.set_interpolate_pos_encoding(t.data()[0] != 0.0),
        Some(t) => bail!(
            "{}: `interpolate_pos_encoding` has shape {:?}; expected a scalar",
            inp.file.display(),
            t.shape()
        ),
    }
    let (_, h, w, c) = pixels.dims4();
    if c != enc.config.channels {
        bail!(
            "{}: `pixel_values` has {c} channels; the model takes {}",
            inp.file.display(),
            enc.config.channels
        );
    }
    // The shape bound first: it names the input's limit, the memory floor only the budget.
    check_patches(inp.file, h, w, enc.config.patch)?;
    enc.check_input(h, w)
        .and_then(|()| enc.check_memory(pixels.dims4().0, h, w))
        .map_err(|e| anyhow::anyhow!("{}: {e}", inp.file.display()))?;
    Ok(vit_outputs(enc.forward(&dev.put(pixels))))
}

/// `DepthAnythingForDepthEstimation`: pixel_values -> predicted_depth.
fn run_depth(model: &Path, inp: &Inputs, dev: &Device) -> Result<Vec<(String, Tensor)>> {
    let pixels = inp.image("pixel_values")?;
    let (_, h, w, c) = pixels.dims4();
    let model = crate::models::depth_anything::DepthAnything::load_dir(
        &crate::weights::layout::component_dir(model, "depth")?,
        dev,
    )?;
    model
        .check_input(h, w, c)
        .map_err(|e| anyhow::anyhow!("{}: {e}", inp.file.display()))?;
    check_patches(inp.file, h, w, model.config.patch_size)?;
    Ok(vec![(
        "predicted_depth".into(),
        model.forward(&dev.put(pixels)),
    )])
}

/// The first or (SDXL) second text encoder on `input_ids`.
fn run_text_encoder(
    model: &Path,
    component: Component,
    inp: &Inputs,
    dev: &Device,
) -> Result<Vec<(String, Tensor)>> {
    let ids = inp.ids()?;
    let sub = if component == Component::TextEncoder {
        "text_encoder"
    } else {
        "text_encoder_2"
    };
    let te = load::load_text_encoder(model, sub, dev)?;
    let o = te.forward(&ids)?;
    let mut v = vec![
        ("last_hidden_state".to_string(), o.last_hidden_state),
        (
            "penultimate_hidden_state".to_string(),
            o.penultimate_hidden_state,
        ),
        ("pooler_output".to_string(), o.pooler_output),
    ];
    if let Some(t) = o.text_embeds {
        v.push(("text_embeds".into(), t));
    }
    Ok(v)
}

/// `CLIPSegForImageSegmentation`: input_ids + pixel_values -> logits and the intermediates.
fn run_clipseg(model: &Path, inp: &Inputs, dev: &Device) -> Result<Vec<(String, Tensor)>> {
    let ids = inp.ids()?;
    let pixels = inp.rank("pixel_values", 4, "[N, 3, H, W]")?;
    let model = ClipSeg::load_dir(model, dev)?;
    let o = model
        .forward(&ids, pixels)
        .map_err(|e| anyhow::anyhow!("{}: {e:#}", inp.file.display()))?;
    let mut v = vec![
        ("logits".to_string(), o.logits),
        (
            "conditional_embeddings".to_string(),
            o.conditional_embeddings,
        ),
        ("pooled_output".to_string(), o.pooled_output),
    ];
    for (j, a) in o.activations.into_iter().enumerate() {
        v.push((format!("activations.{j}"), a));
    }
    Ok(v)
}

/// `SamModel.forward`: `pixel_values` [B, 3, S, S], `input_boxes` [B, n, 4] and / or `input_points`
/// [B, n, k, 2] with `input_labels` [B, n, k] (all 1 when absent), optional `multimask_output`
/// scalar (default 1). Outputs `pred_masks` [B, n, M, h, w], `iou_scores` [B, n, M] and
/// `image_embeddings` [B, C, g, g].
fn run_sam(model: &Path, inp: &Inputs, dev: &Device) -> Result<Vec<(String, Tensor)>> {
    let file = inp.file.display();
    let pixels = inp.image("pixel_values")?;
    let b = pixels.shape()[0];
    let multimask = match inp.get("multimask_output") {
        None => true,
        Some(t) if t.numel() == 1 => t.data()[0] != 0.0,
        Some(t) => bail!(
            "{file}: `multimask_output` has shape {:?}; expected a scalar",
            t.shape()
        ),
    };
    // Boxes are in the model's input frame (the resized image before padding lies inside it):
    // one outside it is a caller's mistake that transformers would silently run with.
    if let Some(bt) = inp.get("input_boxes") {
        if bt.rank() == 3 && bt.shape()[2] == 4 {
            let (h, w) = (pixels.shape()[1], pixels.shape()[2]);
            let boxes: Vec<[f32; 4]> = bt
                .data()
                .chunks(4)
                .map(|c| [c[0], c[1], c[2], c[3]])
                .collect();
            crate::models::sam::check_boxes(&boxes, w, h)
                .map_err(|e| anyhow::anyhow!("{file}: `input_boxes`: {e}"))?;
        }
    }
    let prompts = crate::models::sam::Prompts::new(
        b,
        inp.get("input_points"),
        inp.get("input_labels"),
        inp.get("input_boxes"),
    )
    .map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
    let sam = crate::models::sam::Sam::load_dir(
        &crate::weights::layout::component_dir(model, "sam")?,
        dev,
    )?;
    let out = sam
        .forward(&pixels, &prompts, multimask)
        .map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
    Ok(vec![
        ("pred_masks".into(), out.pred_masks),
        ("iou_scores".into(), out.iou_scores),
        ("image_embeddings".into(), out.image_embeddings),
    ])
}

/// An image encoder's outputs by their transformers names.
pub fn vit_outputs(o: crate::models::vit::VitOutput) -> Vec<(String, Tensor)> {
    let mut v = vec![
        ("last_hidden_state".to_string(), o.last_hidden_state),
        (
            "penultimate_hidden_state".to_string(),
            o.penultimate_hidden_state,
        ),
    ];
    if let Some(t) = o.pooler_output {
        v.push(("pooler_output".into(), t));
    }
    if let Some(t) = o.image_embeds {
        v.push(("image_embeds".into(), t));
    }
    v
}

fn run_unet_adapters(
    model: &Path,
    inputs: &Named,
    inputs_file: &Path,
    dev: &Device,
    adapter_paths: &[std::path::PathBuf],
) -> Result<Vec<(String, Tensor)>> {
    use crate::models::adapter::Adapter;
    use crate::models::blocks::IpInput;
    let inp = Inputs {
        map: inputs,
        file: inputs_file,
    };
    let (sample, ts, ctx, tt) = unet_inputs(&inp, dev)?;
    let b = sample.shape()[0];
    let mut unet = load::load_unet(model, dev)?;
    let n_layers = unet.cross_attention_layers();
    let single = adapter_paths.len() == 1;
    let mut ip = Vec::new();
    let mut outputs = Vec::new();
    for (i, path) in adapter_paths.iter().enumerate() {
        let mut a = Adapter::load(path, dev)?;
        a.attach(&mut unet)?;
        let IpInput { tokens, scales } = ip_input(&a, &inp, dev, path, i, single, n_layers)?;
        // diffusers' [B, images, tokens, dim] view of the projected tokens.
        let per_image = a.tokens.unwrap_or(tokens.shape()[1]);
        let images = tokens.shape()[1] / per_image.max(1);
        outputs.push((
            format!("ip_image_prompt_embeds.{i}"),
            tokens.reshape(vec![b, images, per_image, tokens.shape()[2]]),
        ));
        ip.push(IpInput { tokens, scales });
    }
    let cond = Cond {
        timesteps: &ts,
        context: &ctx,
        text_time: tt.as_ref().map(|(a, c)| (a, c)),
        ip: &ip,
        timestep_cond: None,
    };
    let out = unet.forward(&sample, &cond, None, None)?;
    outputs.insert(0, ("out".into(), out));
    Ok(outputs)
}

/// Adapter `i`'s image tokens (its `ip_image_embeds` projected) and per-layer scales. With one
/// adapter, the inputs may also be named without the index.
fn ip_input(
    a: &crate::models::adapter::Adapter,
    inp: &Inputs,
    dev: &Device,
    path: &Path,
    i: usize,
    single: bool,
    n_layers: usize,
) -> Result<crate::models::blocks::IpInput> {
    let (inputs, file) = (inp.map, inp.file.display());
    let name = |base: &str| -> Option<String> {
        let indexed = format!("{base}.{i}");
        if inputs.contains_key(&indexed) {
            Some(indexed)
        } else if single && inputs.contains_key(base) {
            Some(base.to_string())
        } else {
            None
        }
    };
    let Some(en) = name("ip_image_embeds") else {
        bail!(
            "{file}: missing input tensor `ip_image_embeds.{i}` for adapter {}",
            path.display()
        );
    };
    let embeds = &inputs[&en];
    let tokens = a
        .project(&dev.put(embeds.clone()))
        .map_err(|e| anyhow::anyhow!("{file}: `{en}`: {e}"))?;
    let scales = ip_scales(
        inp,
        name("ip_layer_scales"),
        name("ip_scale"),
        n_layers,
        a.default_scale,
    )?;
    Ok(crate::models::blocks::IpInput { tokens, scales })
}

/// An adapter's scale for each cross-attention layer: from the `layer_scales` input, else the
/// scalar `scale` input, else the adapter's default.
fn ip_scales(
    inp: &Inputs,
    layer_scales: Option<String>,
    scale: Option<String>,
    n_layers: usize,
    default_scale: f32,
) -> Result<Vec<f32>> {
    let (inputs, file) = (inp.map, inp.file.display());
    Ok(match (layer_scales, scale) {
        (Some(n), _) => {
            let t = &inputs[&n];
            if t.numel() != n_layers {
                bail!(
                    "{file}: `{n}` has {} values, the UNet has {n_layers} cross-attention layers",
                    t.numel()
                );
            }
            t.data().to_vec()
        }
        (None, Some(n)) => {
            let t = &inputs[&n];
            if t.numel() != 1 {
                bail!("{file}: `{n}` has shape {:?}; expected a scalar", t.shape());
            }
            vec![t.data()[0]; n_layers]
        }
        (None, None) => vec![default_scale; n_layers],
    })
}
