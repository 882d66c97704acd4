//! A `toffee_generate_options` to a `Request`: the C fields become `request::Settings` and a
//! `request::Spec`, which `request::build` checks as it checks the CLI's flags.

use super::*;

/// The most images one call makes: the C ABI runs a call's images as one batch, and this is
/// `request::Settings`' bound on a batch (refused here naming the field the caller set).
pub(super) const MAX_IMAGES_PER_CALL: u32 = 4_096;

/// The most pixels of one call's images together: they are held at once as floats, and one
/// 16384² image (3 GiB) is the most a call may hold, as `request::MAX_SIDE` bounds one side.
pub(super) const MAX_PIXELS_PER_CALL: usize = MAX_SIDE * MAX_SIDE;

/// The numbers of a generation request, checked (sizes and counts bounded) before any image of
/// the request is read or allocated.
pub(super) fn generate_settings(o: &toffee_generate_options) -> Result<Settings, Fail> {
    let mode = match o.mode {
        0 => Mode::Txt2Img,
        1 => Mode::Img2Img,
        2 => Mode::Inpaint,
        m => return Err(invalid(format!("mode {m} is not 0, 1 or 2"))),
    };
    let n = match o.num_images {
        0 => return Err(invalid("num_images must be at least 1")),
        n if n > MAX_IMAGES_PER_CALL => {
            return Err(invalid(format!(
                "num_images {n} is larger than {MAX_IMAGES_PER_CALL} (one call makes its images as one batch)"
            )))
        }
        n => n as usize,
    };
    let side = |v: u32| (v > 0).then_some(v as usize);
    let settings = Settings {
        mode,
        images_per_prompt: n,
        batch: n,
        width: side(o.width),
        height: side(o.height),
        // ≤ 0: the mode's default; a NaN is passed on to be refused.
        strength: match o.strength {
            s if !s.is_finite() => Some(s as f64),
            s if s <= 0.0 || mode == Mode::Txt2Img => None,
            s => Some(s as f64),
        },
        control_scale: o.control_scale,
        ..Settings::txt2img(o.steps as usize, o.guidance, o.seed)
    };
    settings
        .check(Naming::Fields)
        .map_err(|err| invalid(format!("{err:#}")))?;
    Ok(settings)
}

/// The request of a toffee_generate_options: the C struct becomes a `request::Spec`, which
/// `request::build` checks as it checks the CLI's flags.
///
/// # Safety
/// The strings and images of `o` are null or valid (the header's contract).
pub(super) unsafe fn generate_request(
    e: &Engine,
    o: &toffee_generate_options,
) -> Result<Request, Fail> {
    let mut settings = generate_settings(o)?;
    let prompt = unsafe { text(o.prompt, "prompt")? };
    let negative = unsafe { opt_text(o.negative_prompt, "negative_prompt")? };
    settings.scheduler = match unsafe { opt_text(o.scheduler, "scheduler")? } {
        Some(s) => Some(
            s.parse()
                .map_err(|err: anyhow::Error| invalid(format!("{err:#}")))?,
        ),
        None => None,
    };
    let spec = Spec {
        negative,
        image: unsafe { image_tensor(o.init_image, "init_image", 3)? },
        mask: unsafe { image_tensor(o.mask, "mask", 1)? },
        control: unsafe { image_tensor(o.control_image, "control_image", 3)? },
        image_prompts: unsafe { adapter_prompts(e, o)? },
        ..Spec::new(settings, vec![prompt], Naming::Fields)
    };
    request::build(&e.gen, spec).map_err(|err| invalid(format!("{err:#}")))
}

/// The bytes of a request's RGB8 images, refused over `MAX_PIXELS_PER_CALL` before sampling
/// allocates anything of that size (width and height may be the model's or the image's).
pub(super) fn output_bytes(req: &Request) -> Result<usize, Fail> {
    let n = req.prompts.len() * req.images_per_prompt;
    let (w, h) = (req.width, req.height);
    n.checked_mul(w)
        .and_then(|p| p.checked_mul(h))
        .filter(|&p| p <= MAX_PIXELS_PER_CALL)
        .and_then(|p| p.checked_mul(3))
        .ok_or_else(|| {
            invalid(format!(
                "num_images {n} × width {w} × height {h} is more than the {MAX_PIXELS_PER_CALL} pixels one call makes"
            ))
        })
}

/// Samples a checked request: the images [N, H, W, 3] in [0, 1].
pub(super) fn sample(e: &Engine, req: &Request) -> Result<Tensor, Fail> {
    Ok(e.gen.run(req, &mut |_, _| {})?.images)
}

/// The engine's adapter prompt for `adapter_image` (the engine holds at most one adapter).
pub(super) unsafe fn adapter_prompts(
    e: &Engine,
    o: &toffee_generate_options,
) -> Result<Vec<ImagePrompt>, Fail> {
    let image = unsafe { image_tensor(o.adapter_image, "adapter_image", 3)? };
    match (&e.adapter_encoder, image) {
        (Some(enc), Some(img)) => {
            // < 0 asks for the adapter's default; NaN and inf go on to be refused by name.
            let s = o.adapter_scale;
            let scales = if s >= 0.0 || !s.is_finite() {
                vec![s]
            } else {
                vec![]
            };
            let rgb = crate::image_io::to_rgb8(&img);
            let one = std::slice::from_ref(enc);
            let naming = crate::pipeline::request::Naming::Fields;
            let prompts = crate::pipeline::image_prompt::adapter_prompts;
            Ok(prompts(&e.gen, one, &[rgb], &scales, naming)?)
        }
        (None, None) => Ok(Vec::new()),
        (Some(_), None) => Err(invalid("the engine has an adapter: give adapter_image")),
        (None, Some(_)) => Err(invalid("adapter_image given but the engine has no adapter")),
    }
}
