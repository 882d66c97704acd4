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
    // The UNets' sizes first: a config claiming a huge one is refused before anything loads.
    if let Some(m) = &p.model {
        check_sample_size(m, "model", 64)?;
    }
    if let Some(v) = &p.view {
        check_sample_size(v, "view_model", 32)?;
    }
    let dev = crate::models::load::open_device(&p.device, p.model.as_deref(), "unet")?;
    let mut gen = match &p.model {
        Some(m) => Generator::load(m, p.controlnet.as_deref(), &dev)?,
        None => crate::builtin::generator(&dev)?,
    };
    check_default_size(gen.default_size, "model")?;
    let adapter_encoder = match &p.adapter {
        Some(a) => {
            let ad = Adapter::load(a, &dev)?;
            let enc = load_encoder(&ad, p.adapter_encoder.as_deref(), &dev)?;
            gen.attach_adapter(ad)?;
            Some(enc)
        }
        None => None,
    };
    let scorer = match (&p.dino, &p.clip) {
        (Some(d), Some(c)) => Some(Scorer::load(d, c, &dev)?),
        _ => None,
    };
    let view = p
        .view
        .as_ref()
        .map(|v| ViewGenerator::load(v, &dev))
        .transpose()?;
    if let Some(v) = &view {
        check_default_size(v.default_size, "view_model")?;
    }
    Ok(toffee_engine {
        inner: Mutex::new(Engine {
            gen,
            adapter_encoder,
            view,
            scorer,
        }),
    })
}

/// A UNet's `sample_size` (in latents) makes the default image side of every call that gives no
/// size; read before the model loads so that an absurd one is refused before anything is
/// allocated (and before `sample_size × the VAE's factor` could overflow).
pub(super) fn check_sample_size(model: &Path, what: &str, default: usize) -> Result<(), Fail> {
    let side = Checkpoint::open(model, "unet")?
        .config
        .usize_or("sample_size", default)?;
    if side == 0 || side > MAX_SIDE {
        return Err(Fail(
            TOFFEE_ERROR,
            format!("{what}: the unet's sample_size {side} is not 1 to {MAX_SIDE}"),
        ));
    }
    Ok(())
}

/// The default image side (`sample_size × the VAE's factor`) within the bound of a requested
/// side: a call that gives no size makes images of this side.
pub(super) fn check_default_size(side: usize, what: &str) -> Result<(), Fail> {
    if side == 0 || side > MAX_SIDE {
        return Err(Fail(
            TOFFEE_ERROR,
            format!(
                "{what}: the unet's sample_size × the VAE's factor is {side} pixels, not 1 to {MAX_SIDE}"
            ),
        ));
    }
    Ok(())
}
