//! `toffee bench`: calls per second of one model (random weights of a real configuration, or a
//! checkpoint folder) on random inputs. On a GPU the timed calls are CUDA-graph replays.

use crate::backend::Device;
use crate::config::Config;
use crate::configs::{Known, KnownVision};
use crate::forward::Component;
use crate::models::clip_text::ClipText;
use crate::models::controlnet::ControlNet;
use crate::models::load::{
    image_encoder_dir, normalise_image_encoder, normalise_text_encoder, Checkpoint,
};
use crate::models::unet::{Cond, Unet};
use crate::models::vae::{self, Vae};
use crate::models::vit::Vit;
use crate::pipeline::graph::StepGraph;
use crate::tensor::Tensor;
use crate::weights::WeightStore;
use anyhow::{bail, Result};
use std::path::PathBuf;
use std::time::Instant;

/// A known configuration name or a model folder.
#[derive(Clone, Debug)]
pub enum Source {
    Known(Known),
    KnownVision(KnownVision),
    Dir(PathBuf),
}

impl std::str::FromStr for Source {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Source> {
        Ok(match s {
            "sd15" => Source::Known(Known::Sd15),
            "zero123" => Source::Known(Known::Zero123),
            "sd21" => Source::Known(Known::Sd21),
            "sdxl" => Source::Known(Known::Sdxl),
            "dinov2-b14" => Source::KnownVision(KnownVision::Dinov2B14),
            "clip-l14" => Source::KnownVision(KnownVision::ClipL14),
            p => Source::Dir(PathBuf::from(p)),
        })
    }
}

pub struct Options {
    pub source: Source,
    pub component: Component,
    pub batch: usize,
    pub resolution: Option<usize>,
    pub iters: usize,
    pub warmup: usize,
}

#[derive(serde::Serialize)]
pub struct Report {
    pub component: String,
    pub config: String,
    pub batch: usize,
    pub resolution: usize,
    pub ms_per_call: f64,
    pub calls_per_s: f64,
    pub device: String,
}

fn rand(shape: Vec<usize>, seed: u64, scale: f32) -> Tensor {
    let n = shape.iter().product();
    Tensor::new(
        shape,
        crate::rng::normal(seed, 0, n)
            .into_iter()
            .map(|v| v * scale)
            .collect(),
    )
}

/// Config and weights for the component: random weights for known configs, the folder's otherwise.
fn model_source(src: &Source, comp: Component) -> Result<(Config, WeightStore, String)> {
    if matches!(comp, Component::Clipseg | Component::Sam | Component::Depth) {
        return Err(no_benchmark(comp));
    }
    match src {
        Source::KnownVision(k) => {
            if comp != Component::ImageEncoder {
                bail!(
                    "--config {}: an image encoder configuration; use --component image-encoder",
                    k.name()
                );
            }
            Ok((
                Config::from_json(&format!("<{}>/config.json", k.name()), k.config())?,
                WeightStore::random(7),
                k.name().into(),
            ))
        }
        Source::Known(k) => {
            let json = match comp {
                Component::Unet => k.unet(),
                Component::Controlnet => k.controlnet(),
                Component::VaeEncode | Component::VaeDecode => k.vae(),
                Component::TextEncoder | Component::TextEncoder2 => k.text_encoder(),
                Component::ImageEncoder => bail!(
                    "--config {}: no image encoder in this configuration (use dinov2-b14 or clip-l14)",
                    k.name()
                ),
                Component::Depth | Component::Sam | Component::Clipseg => {
                    return Err(no_benchmark(comp))
                }
            };
            Ok((
                Config::from_json(
                    &format!("<{}>/{}/config.json", k.name(), comp.subfolder()),
                    json,
                )?,
                WeightStore::random(7),
                k.name().into(),
            ))
        }
        Source::Dir(p) => {
            let dir = if comp == Component::ImageEncoder {
                image_encoder_dir(p)
            } else {
                p.clone()
            };
            let mut ck = Checkpoint::open(&dir, comp.subfolder())?;
            if comp == Component::ImageEncoder {
                normalise_image_encoder(&mut ck.weights);
            }
            if matches!(comp, Component::TextEncoder | Component::TextEncoder2) {
                normalise_text_encoder(&mut ck.weights);
            }
            if matches!(comp, Component::VaeEncode | Component::VaeDecode) {
                ck.weights.normalise_names(vae::normalise_legacy_name);
            }
            Ok((ck.config, ck.weights, p.display().to_string()))
        }
    }
}

enum UnetLike {
    Unet(Box<Unet>),
    Control(Box<ControlNet>),
}

/// Components `bench` cannot time yet: a clear error rather than a wrong model.
fn no_benchmark(comp: Component) -> anyhow::Error {
    anyhow::anyhow!(
        "--component {}: no benchmark yet (run it with `toffee forward --component {}`)",
        comp.name(),
        comp.name()
    )
}

pub fn run(o: &Options, dev: &Device) -> Result<Report> {
    if matches!(
        o.component,
        Component::Clipseg | Component::Sam | Component::Depth
    ) {
        return Err(no_benchmark(o.component));
    }
    if o.batch == 0 || o.iters == 0 {
        bail!("--batch and --iters must be at least 1");
    }
    let (cfg, store, name) = model_source(&o.source, o.component)?;
    let b = o.batch;
    let res = resolution(o, &cfg)?;
    let (inputs, call) = model_call(o, &cfg, &store, dev, res)?;
    let ms = time_calls(o, dev, &inputs, &call)?;
    Ok(Report {
        component: o.component.name().into(),
        config: name,
        batch: b,
        resolution: res,
        ms_per_call: ms,
        calls_per_s: 1000.0 / ms,
        device: dev.name(),
    })
}

/// The image side: `--resolution`, else the configuration's own.
fn resolution(o: &Options, cfg: &Config) -> Result<usize> {
    let image_encoder = o.component == Component::ImageEncoder;
    let res = match (o.resolution, &o.source) {
        (Some(r), _) => r,
        (None, Source::Known(k)) => k.resolution(),
        (None, Source::KnownVision(k)) => k.resolution(),
        (None, Source::Dir(_)) if image_encoder => {
            crate::models::vit::VitConfig::parse(cfg)?.image_size
        }
        (None, Source::Dir(_)) => 512,
    };
    if res == 0 || (!image_encoder && res % 8 != 0) {
        bail!("--resolution {res} is not a positive multiple of 8");
    }
    Ok(res)
}

/// Every variant returns (inputs, call) where call(inputs) is one model call.
type Call = Box<dyn Fn(&[Tensor]) -> Result<Tensor>>;

/// The loaded model and random inputs for one call of it.
fn model_call(
    o: &Options,
    cfg: &Config,
    store: &WeightStore,
    dev: &Device,
    res: usize,
) -> Result<(Vec<Tensor>, Call)> {
    let (b, l) = (o.batch, res / 8);
    // The random inputs themselves, before any model-specific bound below.
    crate::budget::check(crate::budget::f32_bytes(&[b, res, res, 4]), || {
        format!("--batch {b} at --resolution {res}")
    })?;
    Ok(match o.component {
        Component::Unet | Component::Controlnet => unet_call(o, cfg, store, dev, res)?,
        Component::VaeEncode => {
            let vae = Vae::load(cfg, store, dev)?;
            // The encoder's first level and mid attention match the decoder's last ones.
            crate::budget::check(vae.decode_floor(b, res, res), || {
                format!("encoding --batch {b} at --resolution {res}")
            })?;
            (
                vec![dev.put(rand(vec![b, res, res, 3], 5, 0.5))],
                Box::new(move |v: &[Tensor]| Ok(vae.encode(&v[0])?.0)),
            )
        }
        Component::VaeDecode => {
            let vae = Vae::load(cfg, store, dev)?;
            crate::budget::check(vae.decode_floor(b, res, res), || {
                format!("decoding --batch {b} at --resolution {res}")
            })?;
            (
                vec![dev.put(rand(vec![b, l, l, 4], 6, 1.0))],
                Box::new(move |v: &[Tensor]| vae.decode(&v[0])),
            )
        }
        Component::ImageEncoder => {
            let vit = Vit::load(cfg, store, dev)?;
            vit.check_input(res, res)?;
            vit.check_memory(b, res, res)?;
            (
                vec![dev.put(rand(vec![b, res, res, vit.config.channels], 8, 1.0))],
                Box::new(move |v: &[Tensor]| Ok(vit.forward(&v[0]).last_hidden_state)),
            )
        }
        Component::Depth | Component::Sam | Component::Clipseg => {
            return Err(no_benchmark(o.component))
        }
        Component::TextEncoder | Component::TextEncoder2 => {
            let te = ClipText::load(cfg, store, dev)?;
            let ids: Vec<Vec<u32>> = (0..b)
                .map(|i| {
                    (0..77)
                        .map(|j| ((i * 7919 + j * 104729) % 49000) as u32)
                        .collect()
                })
                .collect();
            let (tokens, pool) = te.index_tensors(&ids);
            (
                vec![tokens, pool],
                Box::new(move |v: &[Tensor]| {
                    Ok(te.forward_indices(&v[0], &v[1], b, 77).last_hidden_state)
                }),
            )
        }
    })
}

/// A UNet or ControlNet call: sample, timesteps, context, SDXL's text embeds and time ids, and
/// the ControlNet's conditioning image.
fn unet_call(
    o: &Options,
    cfg: &Config,
    store: &WeightStore,
    dev: &Device,
    res: usize,
) -> Result<(Vec<Tensor>, Call)> {
    let (b, l) = (o.batch, res / 8);
    let model = if o.component == Component::Unet {
        UnetLike::Unet(Box::new(Unet::load(cfg, store, dev)?))
    } else {
        UnetLike::Control(Box::new(ControlNet::load(cfg, store, dev)?))
    };
    let c = match &model {
        UnetLike::Unet(u) => &u.config,
        UnetLike::Control(n) => &n.config,
    };
    crate::budget::check(crate::pipeline::unet_floor(c, dev, b, (l, l)), || {
        format!("--batch {b} at --resolution {res}")
    })?;
    let (ctx_dim, text_time) = (c.cross_attention_dim[0], c.text_time);
    let cin = cfg.usize_or("in_channels", 4)?;
    let mut inputs = vec![
        dev.put(rand(vec![b, l, l, cin], 1, 1.0)),
        dev.put_f32(Tensor::new(vec![b], vec![500.0; b])),
        dev.put(rand(vec![b, 77, ctx_dim], 2, 1.0)),
    ];
    if let Some((td, proj)) = text_time {
        inputs.push(dev.put(rand(vec![b, proj - 6 * td], 3, 1.0)));
        let ids = [res as f32, res as f32, 0.0, 0.0, res as f32, res as f32];
        inputs.push(dev.put_f32(Tensor::new(vec![b, 6], ids.repeat(b))));
    }
    if o.component == Component::Controlnet {
        inputs.push(dev.put(rand(vec![b, res, res, 3], 4, 0.5)));
    }
    let call: Call = Box::new(move |v: &[Tensor]| {
        let tt = if v.len() >= 5 {
            Some((&v[3], &v[4]))
        } else {
            None
        };
        let cond = Cond {
            timesteps: &v[1],
            context: &v[2],
            text_time: tt,
            ip: &[],
            timestep_cond: None,
        };
        match &model {
            UnetLike::Unet(u) => u.forward(&v[0], &cond, None, None),
            UnetLike::Control(n) => Ok(n.forward(&v[0], &cond, v.last().expect("image"), 1.0)?.mid),
        }
    });
    Ok((inputs, call))
}

/// Milliseconds per call over `--iters` calls, after the warm-up calls.
fn time_calls(o: &Options, dev: &Device, inputs: &[Tensor], call: &Call) -> Result<f64> {
    let graphable = !matches!(
        o.component,
        Component::TextEncoder | Component::TextEncoder2
    );
    let mut graph = StepGraph::new(if graphable { dev } else { &Device::Cpu });
    for _ in 0..o.warmup.max(2) {
        let _ = graph.run("bench", inputs, |v| call(v).map(|t| vec![t]))?;
    }
    dev.synchronize()?;
    let start = Instant::now();
    for _ in 0..o.iters {
        let _ = graph.run("bench", inputs, |v| call(v).map(|t| vec![t]))?;
    }
    dev.synchronize()?;
    let secs = start.elapsed().as_secs_f64();
    Ok(secs * 1000.0 / o.iters as f64)
}
