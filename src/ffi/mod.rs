//! The C ABI (`include/toffee.h`, generated from this file by cbindgen; `tests/suite/ffi.rs` fails when
//! the committed header differs from what this file generates).
//!
//! Rules at the boundary: every function returns a `toffee_status` (or is infallible); no panic
//! crosses it (each entry point catches one and returns `TOFFEE_PANIC`); null pointers, bad UTF-8,
//! out-of-range enums and too-small buffers are `TOFFEE_INVALID_ARGUMENT` /
//! `TOFFEE_BUFFER_TOO_SMALL` with a message in `toffee_last_error()`. Option structs start with a
//! `size` field (the caller's `sizeof`); later ABI versions only append fields and read them when
//! `size` covers them.
//!
//! The host survives its own mistakes: an engine handle is a token the library looks up, never
//! an address it follows, so a closed, never-opened or made-up handle is
//! `TOFFEE_INVALID_ARGUMENT` ("engine is closed or not an engine"), closing twice is harmless,
//! and a call running while another thread closes its engine finishes first (the engine is freed
//! when the call returns). Sizes are checked before anything is allocated (Rust aborts the
//! process when an allocation fails): image sides at most 16384, num_images at most 4096, one
//! call's images at most 16384² pixels, steps at most 10000, a model's default size at most
//! 16384; a bigger number is a status naming the field. A failed call leaves no thread and no
//! memory behind.
//!
//! This file holds everything C sees (cbindgen reads only it); `handles`, `convert`, `open`,
//! `requests` and `pairs` hold the work behind the entry points.
#![allow(non_camel_case_types)]

mod convert;
mod handles;
mod open;
mod pairs;
mod requests;

use convert::*;
use handles::*;
use open::*;
use pairs::*;
use requests::*;

use crate::dataset;

use crate::pipeline::noise::NoiseSource;
use crate::pipeline::request::{self, Mode, Naming, Settings, Spec, MAX_SIDE};
use crate::pipeline::score::{ImageEncoder, Mask, ScoreInput, Scorer};
use crate::pipeline::view::{Pose, View, ViewGenerator, ViewRequest};
use crate::pipeline::{Generator, ImagePrompt, Request};
use crate::tensor::Tensor;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Incremented on every incompatible change of this header.
pub const TOFFEE_ABI_VERSION: u32 = 1;

/// The result of every call.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum toffee_status {
    TOFFEE_OK = 0,
    /// The engine failed (a model, a file, the device); see toffee_last_error().
    TOFFEE_ERROR = 1,
    /// A null pointer, bad UTF-8, an out-of-range value or a struct `size` too small.
    TOFFEE_INVALID_ARGUMENT = 2,
    /// A caller-provided buffer is too small; the message says how large it must be.
    TOFFEE_BUFFER_TOO_SMALL = 3,
    /// Stopped through the cancellation flag or the progress callback.
    TOFFEE_CANCELLED = 4,
    /// A bug inside the engine was caught at the boundary; the engine should be closed.
    TOFFEE_PANIC = 5,
    /// `toffee_pairs_run` could not start: the config, subjects, slice, output folder, device or
    /// models are wrong (nothing was built; fix them first). TOFFEE_ERROR from it means a shard
    /// failed after the work started (finished shards are intact; run again to resume).
    TOFFEE_SETUP_ERROR = 6,
}

use toffee_status::*;

/// An 8-bit image, row-major, `channels` interleaved (3: RGB, 1: a mask, white = inside).
/// Images the engine returns own `data` until `toffee_image_free`; images the caller passes in
/// stay the caller's, and their sides must be 1 to 16384.
#[repr(C)]
pub struct toffee_image {
    pub width: u32,
    pub height: u32,
    pub channels: u32,
    pub data: *mut u8,
}

/// Which models an engine opens. Null paths are absent models; with `model` null the built-in
/// demo text-to-image model is used.
#[repr(C)]
pub struct toffee_engine_options {
    /// sizeof(toffee_engine_options).
    pub size: u32,
    /// "cpu", "cuda", "cuda:N", "emu" (the software GPU, builds with the `emu` feature); null: "cpu".
    pub device: *const c_char,
    /// A diffusers pipeline folder (text-to-image, img2img, inpainting).
    pub model: *const c_char,
    pub controlnet: *const c_char,
    /// An IP-Adapter file or a Toffee adapter folder, attached to the model's UNet.
    pub adapter: *const c_char,
    /// The adapter's image encoder (null: found beside the adapter).
    pub adapter_encoder: *const c_char,
    /// A Zero1to3-layout View Generator folder.
    pub view_model: *const c_char,
    /// DINO (v1 or v2) and CLIPModel folders, for embeddings and scores (both or neither).
    pub dino: *const c_char,
    pub clip: *const c_char,
}

/// An open engine: models loaded on one device. Calls on one engine are serialised (it may be
/// used from several threads); several engines may run at once. A `toffee_engine *` is an opaque
/// handle (not the engine's address): a closed or unknown one is TOFFEE_INVALID_ARGUMENT.
pub struct toffee_engine {
    inner: Mutex<Engine>,
}

struct Engine {
    gen: Generator,
    adapter_encoder: Option<ImageEncoder>,
    view: Option<ViewGenerator>,
    scorer: Option<Scorer>,
}

/// What to generate. `mode`: 0 text-to-image, 1 img2img (`init_image`, `strength`; with `mask`,
/// only inside it), 2 inpainting (`init_image`, `mask`).
#[repr(C)]
pub struct toffee_generate_options {
    /// sizeof(toffee_generate_options).
    pub size: u32,
    pub mode: u32,
    pub prompt: *const c_char,
    /// Null: none.
    pub negative_prompt: *const c_char,
    /// Images to make, 1 to 4096 (at most 16384² pixels together); image i uses seed + i (as the
    /// CLI does).
    pub num_images: u32,
    /// 1 to 10000.
    pub steps: u32,
    pub guidance: f32,
    pub seed: u64,
    /// 0: the model's default size (img2img/inpainting: the init image's size); else a multiple
    /// of the VAE's factor (8 for Stable Diffusion) up to 16384.
    pub width: u32,
    pub height: u32,
    /// ddim, euler, euler-a, dpmpp-2m, dpmpp-2m-karras, pndm; null: the model's own.
    pub scheduler: *const c_char,
    pub init_image: *const toffee_image,
    pub mask: *const toffee_image,
    /// img2img / inpainting strength; ≤ 0: the default (0.8 img2img, 1.0 inpainting).
    pub strength: f32,
    /// ControlNet conditioning image (engines opened with a ControlNet).
    pub control_image: *const toffee_image,
    pub control_scale: f32,
    /// The adapter's subject image (engines opened with an adapter).
    pub adapter_image: *const toffee_image,
    /// λ; < 0: the adapter's default.
    pub adapter_scale: f32,
}

/// DINO, CLIP-I and CLIP-T (raw cosines).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct toffee_scores {
    pub dino: f32,
    pub clip_i: f32,
    pub clip_t: f32,
}

/// Which image encoder `toffee_embed_image` uses.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum toffee_encoder {
    TOFFEE_ENCODER_DINO = 0,
    TOFFEE_ENCODER_CLIP = 1,
}

/// Called after every finished shard with (user, records done, records to do); a nonzero return
/// cancels the run after the batch in flight.
pub type toffee_progress_fn =
    Option<unsafe extern "C" fn(user: *mut c_void, done: u64, total: u64) -> i32>;

/// A pairs job (see `toffee pairs --help`).
#[repr(C)]
pub struct toffee_pairs_options {
    /// sizeof(toffee_pairs_options).
    pub size: u32,
    /// pairs.toml; null: built-in models.
    pub config: *const c_char,
    /// A subjects folder or JSONL; null: built-in subjects.
    pub subjects: *const c_char,
    pub out_dir: *const c_char,
    /// Comma-separated devices; null: "cpu".
    pub devices: *const c_char,
    /// This process's slice; num_shards 0: from the environment, else 0 of 1.
    pub shard_index: u32,
    pub num_shards: u32,
    pub keep_rejected: bool,
    pub progress: toffee_progress_fn,
    pub user: *mut c_void,
    /// Polled during the run; set it nonzero (from any thread) to stop after the batch in flight.
    pub cancel: *const i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct toffee_pairs_summary {
    pub records: u64,
    pub kept: u64,
    pub rejected: u64,
    pub shards_built: u64,
}

thread_local! {
    static LAST_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
}

struct Fail(toffee_status, String);

impl From<anyhow::Error> for Fail {
    fn from(e: anyhow::Error) -> Fail {
        Fail(TOFFEE_ERROR, format!("{e:#}"))
    }
}

fn invalid(msg: impl Into<String>) -> Fail {
    Fail(TOFFEE_INVALID_ARGUMENT, msg.into())
}

/// Runs an entry point: catches panics, records the error message of this thread.
fn guard(f: impl FnOnce() -> Result<(), Fail>) -> toffee_status {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    let (status, msg) = match r {
        Ok(Ok(())) => (TOFFEE_OK, None),
        Ok(Err(Fail(s, m))) => (s, Some(m)),
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown".into());
            (
                TOFFEE_PANIC,
                Some(format!("internal error (panic): {what}")),
            )
        }
    };
    LAST_ERROR.with(|l| {
        *l.borrow_mut() = msg.map(|m| CString::new(m.replace('\0', " ")).expect("no NUL"));
    });
    status
}

/// The ABI version this library implements (TOFFEE_ABI_VERSION of its header).
#[no_mangle]
pub extern "C" fn toffee_abi_version() -> u32 {
    TOFFEE_ABI_VERSION
}

/// The library version, e.g. "0.1.0" (static storage).
#[no_mangle]
pub extern "C" fn toffee_version_string() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}

/// The message of the last failed call on this thread, or null after a successful one; valid
/// until the next call on this thread.
#[no_mangle]
pub extern "C" fn toffee_last_error() -> *const c_char {
    LAST_ERROR.with(|l| l.borrow().as_ref().map_or(std::ptr::null(), |c| c.as_ptr()))
}

/// Opens an engine; `*out` receives its handle (close it with toffee_engine_close).
///
/// # Safety
/// `opts` points to a valid toffee_engine_options whose strings are NUL-terminated; `out` is
/// writable.
#[no_mangle]
pub unsafe extern "C" fn toffee_engine_open(
    opts: *const toffee_engine_options,
    out: *mut *mut toffee_engine,
) -> toffee_status {
    guard(|| {
        if out.is_null() {
            return Err(invalid("out is null"));
        }
        // Safety: see the function's contract.
        let o = unsafe { options(opts, |o| o.size, "toffee_engine_options")? };
        let paths = unsafe { EnginePaths::read(o)? };
        let handle = register_engine(open_engine(&paths)?)?;
        // Safety: `out` is writable (checked non-null).
        unsafe { *out = handle };
        Ok(())
    })
}

/// Closes an engine: it is freed (host and device memory) now, or when a call another thread is
/// making on it returns. Null, an engine closed already and a handle that never was one are
/// ignored (a double close is harmless; toffee_last_error() then names the mistake).
///
/// # Safety
/// Any value of `e` is safe: the handle is looked up, never dereferenced (the Rust declaration
/// stays `unsafe` so that existing Rust callers compile unchanged).
#[no_mangle]
pub unsafe extern "C" fn toffee_engine_close(e: *mut toffee_engine) {
    guard(|| {
        if e.is_null() {
            return Ok(());
        }
        // Dropped here unless a running call holds the engine; models do not panic in drop, and
        // `guard` catches it if one ever does.
        drop(unregister_engine(e)?);
        Ok(())
    });
}

fn lock(e: &toffee_engine) -> MutexGuard<'_, Engine> {
    e.inner.lock().unwrap_or_else(|p| p.into_inner())
}

/// Generates `opts->num_images` images into `out[0..num_images]` (the engine allocates each
/// image's data; free it with toffee_image_free).
///
/// # Safety
/// `e` is an open engine, `opts` a valid toffee_generate_options, `out` an array of
/// `opts->num_images` toffee_image.
#[no_mangle]
pub unsafe extern "C" fn toffee_generate(
    e: *const toffee_engine,
    opts: *const toffee_generate_options,
    out: *mut toffee_image,
) -> toffee_status {
    guard(|| {
        let eng = engine(e)?;
        let o = unsafe { options(opts, |o| o.size, "toffee_generate_options")? };
        if out.is_null() {
            return Err(invalid("out is null"));
        }
        let e = lock(&eng);
        let req = unsafe { generate_request(&e, o)? };
        output_bytes(&req)?;
        let images = sample(&e, &req)?;
        let (n, h, w, _) = images.dims4();
        for i in 0..n {
            let img = engine_image(w, h, to_bytes(&images.narrow0(i, 1)));
            // Safety: out holds num_images entries (the caller's contract).
            unsafe { out.add(i).write(img) };
        }
        Ok(())
    })
}

/// Generates into a caller buffer of `len` bytes: num_images RGB8 images one after another.
///
/// # Safety
/// `buf` is writable for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn toffee_generate_into(
    e: *const toffee_engine,
    opts: *const toffee_generate_options,
    buf: *mut u8,
    len: usize,
) -> toffee_status {
    guard(|| {
        let eng = engine(e)?;
        let o = unsafe { options(opts, |o| o.size, "toffee_generate_options")? };
        if buf.is_null() {
            return Err(invalid("buf is null"));
        }
        let e = lock(&eng);
        let req = unsafe { generate_request(&e, o)? };
        // Before sampling: a small buffer costs no generation.
        let need = output_bytes(&req)?;
        if need > len {
            return Err(Fail(
                TOFFEE_BUFFER_TOO_SMALL,
                format!("the images need {need} bytes, the buffer has {len}"),
            ));
        }
        let bytes = to_bytes(&sample(&e, &req)?);
        debug_assert_eq!(bytes.len(), need);
        // Safety: buf is writable for len bytes, and never more are written (len ≥ need, which
        // is bytes.len()).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf, bytes.len().min(len)) };
        Ok(())
    })
}

/// Frees the data of an image the engine returned and sets `data` to null. Null, a null `data`
/// and a `data` the engine did not allocate (or freed already) are ignored: freeing twice is
/// harmless, even through a copy of the struct, unless the engine has since returned a new image
/// at the same address (so do not keep copies after freeing). The length freed is the one
/// allocated, whatever `width`, `height` or `channels` say by then.
///
/// # Safety
/// `img` is null or points to a readable and writable toffee_image.
#[no_mangle]
pub unsafe extern "C" fn toffee_image_free(img: *mut toffee_image) {
    guard(|| {
        if img.is_null() {
            return Ok(());
        }
        // Safety: see the contract.
        let i = unsafe { &mut *img };
        if i.data.is_null() {
            return Ok(());
        }
        let len = registry(&IMAGES).remove(&i.data.addr()).ok_or_else(|| {
            invalid("image data was not allocated by toffee, or is freed already")
        })?;
        // Safety: registered by engine_image as a boxed slice of `len` bytes, and removed from
        // the registry above, so it is freed once.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(i.data, len)) });
        i.data = std::ptr::null_mut();
        Ok(())
    });
}

/// A novel view of `subject` (RGB; `mask` optional, 1 channel) with the engine's View Generator:
/// polar/azimuth in degrees, radius change; the image is allocated as by toffee_generate.
///
/// # Safety
/// Pointers as in toffee_generate.
#[no_mangle]
pub unsafe extern "C" fn toffee_view(
    e: *const toffee_engine,
    subject: *const toffee_image,
    mask: *const toffee_image,
    polar: f32,
    azimuth: f32,
    radius: f32,
    steps: u32,
    guidance: f32,
    seed: u64,
    out: *mut toffee_image,
) -> toffee_status {
    guard(|| {
        let eng = engine(e)?;
        if out.is_null() {
            return Err(invalid("out is null"));
        }
        if !(polar.is_finite() && azimuth.is_finite() && radius.is_finite()) {
            return Err(invalid("polar, azimuth and radius must be finite numbers"));
        }
        // The rules of a generation's steps and guidance (at least 1 step, at most 10000: the
        // schedule is allocated per step).
        Settings::txt2img(steps as usize, guidance, seed)
            .check(Naming::Fields)
            .map_err(|err| invalid(format!("{err:#}")))?;
        let e = lock(&eng);
        let Some(vg) = &e.view else {
            return Err(invalid("the engine was opened without view_model"));
        };
        let s = vg.default_size;
        let req = ViewRequest {
            subjects: vec![unsafe { view_subject(subject, mask, s)? }],
            views: vec![View {
                subject: 0,
                pose: Pose {
                    polar,
                    azimuth,
                    radius,
                },
            }],
            steps: steps as usize,
            guidance,
            scheduler: None,
            seed,
            batch: 1,
        };
        let mut noise = NoiseSource::seeded(vec![seed]);
        let (_, img) = vg.run_chunk(&req, 0, 1, &mut noise, &mut |_, _| {})?;
        // Safety: out is writable (checked non-null).
        unsafe { out.write(engine_image(s, s, to_bytes(&img))) };
        Ok(())
    })
}

/// The View Generator's subject: the caller's image (on white outside its mask) fitted to
/// `side`², on the 8-bit grid as a subject read from a file is.
///
/// # Safety
/// `subject` and `mask` are null or valid images.
unsafe fn view_subject(
    subject: *const toffee_image,
    mask: *const toffee_image,
    side: usize,
) -> Result<Tensor, Fail> {
    let rgb = unsafe { image_tensor(subject, "subject", 3)? }
        .ok_or_else(|| invalid("subject is null"))?;
    let on_white = match unsafe { image_tensor(mask, "mask", 1)? } {
        Some(m) if m.shape()[1..3] != rgb.shape()[1..3] => {
            return Err(invalid("mask and subject sizes differ"))
        }
        Some(m) => crate::image_io::on_white(&rgb, &m),
        None => rgb,
    };
    let fitted = crate::image_io::fit(&on_white, side, side);
    let on_grid = fitted.data().iter().map(|v| (v * 255.0).round() / 255.0);
    Ok(Tensor::new(fitted.shape().to_vec(), on_grid.collect()))
}

fn write_vec(v: &[f32], out: *mut f32, len: usize, dim: *mut usize) -> Result<(), Fail> {
    if !dim.is_null() {
        // Safety: writable when non-null (the caller's contract).
        unsafe { *dim = v.len() };
    }
    if out.is_null() || v.len() > len {
        return Err(Fail(
            TOFFEE_BUFFER_TOO_SMALL,
            format!("the embedding has {} values, the buffer {len}", v.len()),
        ));
    }
    // Safety: out is writable for len ≥ v.len() floats.
    unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), out, v.len()) };
    Ok(())
}

/// The score embedding of an image (DINO: the CLS token; CLIP: the projected image embedding)
/// into `out[0..len]`; `*dim` receives its length (also when the buffer is too small).
///
/// # Safety
/// Pointers as documented; `out` writable for `len` floats.
#[no_mangle]
pub unsafe extern "C" fn toffee_embed_image(
    e: *const toffee_engine,
    encoder: u32,
    image: *const toffee_image,
    out: *mut f32,
    len: usize,
    dim: *mut usize,
) -> toffee_status {
    guard(|| {
        let eng = engine(e)?;
        let e = lock(&eng);
        let s = e
            .scorer
            .as_ref()
            .ok_or_else(|| invalid("the engine was opened without dino and clip"))?;
        let enc = match encoder {
            0 => &s.dino,
            1 => &s.clip,
            x => {
                return Err(invalid(format!(
                    "encoder {x} is not TOFFEE_ENCODER_DINO (0) or TOFFEE_ENCODER_CLIP (1)"
                )))
            }
        };
        let img =
            unsafe { image_tensor(image, "image", 3)? }.ok_or_else(|| invalid("image is null"))?;
        let v = enc.embed(&[crate::image_io::to_rgb8(&img)])?;
        write_vec(&v[0], out, len, dim)
    })
}

/// The CLIP text embedding of `text` (projected), as toffee_embed_image.
///
/// # Safety
/// As toffee_embed_image.
#[no_mangle]
pub unsafe extern "C" fn toffee_embed_text(
    e: *const toffee_engine,
    text_: *const c_char,
    out: *mut f32,
    len: usize,
    dim: *mut usize,
) -> toffee_status {
    guard(|| {
        let eng = engine(e)?;
        let t = unsafe { text(text_, "text")? };
        let e = lock(&eng);
        let s = e
            .scorer
            .as_ref()
            .ok_or_else(|| invalid("the engine was opened without dino and clip"))?;
        let v = s.text_embeddings(&[t.as_str()])?;
        write_vec(&v[0], out, len, dim)
    })
}

/// DINO, CLIP-I and CLIP-T of a subject and a target (masks optional, 1 channel, the size of
/// their image).
///
/// # Safety
/// As toffee_embed_image; `out` writable.
#[no_mangle]
pub unsafe extern "C" fn toffee_score(
    e: *const toffee_engine,
    subject: *const toffee_image,
    subject_mask: *const toffee_image,
    target: *const toffee_image,
    target_mask: *const toffee_image,
    prompt: *const c_char,
    out: *mut toffee_scores,
) -> toffee_status {
    guard(|| {
        let eng = engine(e)?;
        if out.is_null() {
            return Err(invalid("out is null"));
        }
        let p = unsafe { text(prompt, "prompt")? };
        let rgb = |x, w| -> Result<image::RgbImage, Fail> {
            let t =
                unsafe { image_tensor(x, w, 3)? }.ok_or_else(|| invalid(format!("{w} is null")))?;
            Ok(crate::image_io::to_rgb8(&t))
        };
        let mask = |x, w| -> Result<Option<Mask>, Fail> {
            Ok(unsafe { image_tensor(x, w, 1)? }.map(|t| Mask::from_tensor(&t)))
        };
        let input = ScoreInput {
            subject: rgb(subject, "subject")?,
            subject_mask: mask(subject_mask, "subject_mask")?,
            target: rgb(target, "target")?,
            target_mask: mask(target_mask, "target_mask")?,
            prompt: p,
            name: "toffee_score".into(),
        };
        let e = lock(&eng);
        let s = e
            .scorer
            .as_ref()
            .ok_or_else(|| invalid("the engine was opened without dino and clip"))?;
        let r = s.score(std::slice::from_ref(&input))?[0];
        // Safety: out is writable (checked non-null).
        unsafe {
            *out = toffee_scores {
                dino: r.dino,
                clip_i: r.clip_i,
                clip_t: r.clip_t,
            }
        };
        Ok(())
    })
}

/// Runs (or resumes) a pairs job to completion, cancellation or error: TOFFEE_SETUP_ERROR when
/// it could not start, TOFFEE_ERROR when a shard failed, TOFFEE_CANCELLED when stopped (the
/// distinctions of `toffee pairs`' exit codes 2, 1 and 3).
///
/// # Safety
/// `opts` is valid; `cancel`, when non-null, stays readable during the call; `summary` is
/// writable or null.
#[no_mangle]
pub unsafe extern "C" fn toffee_pairs_run(
    opts: *const toffee_pairs_options,
    summary: *mut toffee_pairs_summary,
) -> toffee_status {
    guard(|| {
        let o = unsafe { options(opts, |o| o.size, "toffee_pairs_options")? };
        let out = unsafe { text(o.out_dir, "out_dir")? };
        let devices = unsafe { opt_text(o.devices, "devices")? }.unwrap_or_else(|| "cpu".into());
        let stop = Arc::new(AtomicBool::new(false));
        let callback = progress_callback(o, stop.clone());
        let cancel = o.cancel as usize;
        let options = dataset::Options {
            config: unsafe { opt_path(o.config, "config")? },
            subjects: unsafe { opt_path(o.subjects, "subjects")? },
            templates: None,
            out: PathBuf::from(out),
            shard_index: (o.num_shards > 0).then_some(o.shard_index as usize),
            num_shards: (o.num_shards > 0).then_some(o.num_shards as usize),
            devices: devices.split(',').map(|s| s.trim().to_string()).collect(),
            batch: None,
            keep_rejected: o.keep_rejected,
            progress: false,
            stop: stop.clone(),
            on_shard: Some(callback),
        };
        // Every argument is read before the watcher starts, and the guard stops and joins it on
        // every way out: a failed call leaves no thread behind.
        let watcher = (cancel != 0).then(|| CancelWatcher::spawn(cancel, stop));
        let r = dataset::run(&options);
        drop(watcher);
        let s = r.map_err(|e| {
            let status = if dataset::is_setup_error(&e) {
                TOFFEE_SETUP_ERROR
            } else {
                TOFFEE_ERROR
            };
            Fail(status, format!("{e:#}"))
        })?;
        if !summary.is_null() {
            // Safety: writable when non-null.
            unsafe {
                *summary = toffee_pairs_summary {
                    records: s.stats.records as u64,
                    kept: s.stats.kept as u64,
                    rejected: s.stats.rejected as u64,
                    shards_built: s.shards_done as u64,
                }
            };
        }
        if s.stopped {
            return Err(Fail(
                TOFFEE_CANCELLED,
                "cancelled; finished shards are intact, run again to continue".into(),
            ));
        }
        Ok(())
    })
}
