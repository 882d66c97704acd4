//! `toffee_engine_open`'s work: the option strings read and checked, the sizes the model's
//! configs claim bounded before anything is loaded, the models loaded.

use super::*;

/// The strings of toffee_engine_options, read and checked before anything loads.
pub(super) struct EnginePaths {
    device: String,
    model: Option<PathBuf>,
    controlnet: Option<PathBuf>,
    adapter: Option<PathBuf>,
    adapter_encoder: Option<PathBuf>,
    view: Option<PathBuf>,
    dino: Option<PathBuf>,
    clip: Option<PathBuf>,
}

impl EnginePaths {
    /// # Safety
    /// The strings of `o` are null or NUL-terminated.
    pub(super) unsafe fn read(o: &toffee_engine_options) -> Result<EnginePaths, Fail> {
        let p = unsafe {
            EnginePaths {
                device: opt_text(o.device, "device")?.unwrap_or_else(|| "cpu".into()),
                model: opt_path(o.model, "model")?,
                controlnet: opt_path(o.controlnet, "controlnet")?,
                adapter: opt_path(o.adapter, "adapter")?,
                adapter_encoder: opt_path(o.adapter_encoder, "adapter_encoder")?,
                view: opt_path(o.view_model, "view_model")?,
                dino: opt_path(o.dino, "dino")?,
                clip: opt_path(o.clip, "clip")?,
            }
        };
        if p.model.is_none() && (p.controlnet.is_some() || p.adapter.is_some()) {
            return Err(invalid("controlnet and adapter need a model folder"));
        }
        if p.dino.is_some() != p.clip.is_some() {
            return Err(invalid("dino and clip go together"));
        }
        Ok(p)
    }
}

/// Loads the models of `p` on their device.
pub(super) fn open_engine(p: &EnginePaths) -> Result<toffee_engine, Fail> {
    let dev = crate::models::load::open_device(&p.device, p.model.as_deref(), "unet")?;
    let mut gen = match &p.model {
        Some(m) => Generator::load(m, p.controlnet.as_deref(), &dev)?,
        None => crate::builtin::generator(&dev)?,
    };
    let adapters: Vec<PathBuf> = p.adapter.iter().cloned().collect();
    let encoders: Vec<PathBuf> = p.adapter_encoder.iter().cloned().collect();
    let naming = crate::pipeline::request::Naming::Fields;
    let adapter_encoder =
        crate::pipeline::image_prompt::attach_adapters(&mut gen, &adapters, &encoders, naming)?
            .pop();
    let scorer = match (&p.dino, &p.clip) {
        (Some(d), Some(c)) => Some(Scorer::load(d, c, &dev)?),
        _ => None,
    };
    let view = p
        .view
        .as_ref()
        .map(|v| ViewGenerator::load(v, &dev))
        .transpose()?;
    Ok(toffee_engine {
        inner: Mutex::new(Engine {
            gen,
            adapter_encoder,
            view,
            scorer,
        }),
    })
}
