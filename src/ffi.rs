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
#![allow(non_camel_case_types)]

use crate::dataset;
use crate::models::adapter::Adapter;
use crate::models::load::Checkpoint;
use crate::pipeline::image_prompt::{image_prompt, load_encoder};
use crate::pipeline::noise::NoiseSource;
use crate::pipeline::request::{self, Mode, Naming, Settings, Spec, MAX_SIDE};
use crate::pipeline::score::{ImageEncoder, Mask, ScoreInput, Scorer};
use crate::pipeline::view::{Pose, View, ViewGenerator, ViewRequest};
use crate::pipeline::{Generator, ImagePrompt, Request};
use crate::tensor::Tensor;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::path::{Path, PathBuf};
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

/// The message of every call given a handle that is not an open engine.
const NOT_AN_ENGINE: &str = "engine is closed or not an engine";

/// The open engines by handle. The `toffee_engine *` a caller holds is only a key here, never
/// dereferenced: a closed, never-opened or made-up handle is found missing instead of read as
/// freed or foreign memory. Each call clones the `Arc`, so a close on another thread frees the
/// engine only when that call returns.
static ENGINES: Mutex<BTreeMap<usize, Arc<toffee_engine>>> = Mutex::new(BTreeMap::new());

/// The next handle. Handles are never reused (a stale one cannot reach a newer engine, as a
/// reused address could); they start at 1, as null is "no engine".
static NEXT_HANDLE: AtomicUsize = AtomicUsize::new(1);

/// The data of every image the engine handed out (address → length): `toffee_image_free` frees
/// only these, with the length allocated, whatever the caller's struct says by then.
static IMAGES: Mutex<BTreeMap<usize, usize>> = Mutex::new(BTreeMap::new());

/// A registry's map; nothing panics while holding one, but a poisoned lock must not turn every
/// later call into a panic.
fn registry<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Registers an engine and returns its new handle.
fn register_engine(engine: toffee_engine) -> Result<*mut toffee_engine, Fail> {
    let id = NEXT_HANDLE
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_add(1))
        .map_err(|_| {
            Fail(
                TOFFEE_ERROR,
                "no engine handles are left in this process".into(),
            )
        })?;
    registry(&ENGINES).insert(id, Arc::new(engine));
    Ok(std::ptr::without_provenance_mut(id))
}

/// The engine of a handle, kept alive for the caller's call even if another thread closes it.
fn engine(e: *const toffee_engine) -> Result<Arc<toffee_engine>, Fail> {
    if e.is_null() {
        return Err(invalid("engine is null"));
    }
    let found = registry(&ENGINES).get(&e.addr()).cloned();
    found.ok_or_else(|| invalid(NOT_AN_ENGINE))
}

/// Takes an engine out of the registry; the engine is dropped when the last call using it ends.
fn unregister_engine(e: *const toffee_engine) -> Result<Arc<toffee_engine>, Fail> {
    let removed = registry(&ENGINES).remove(&e.addr());
    removed.ok_or_else(|| invalid(NOT_AN_ENGINE))
}

/// An RGB8 image for the caller; its data is registered for `toffee_image_free`.
fn engine_image(width: usize, height: usize, bytes: Vec<u8>) -> toffee_image {
    let data = Box::into_raw(bytes.into_boxed_slice());
    registry(&IMAGES).insert(data.addr(), data.len());
    toffee_image {
        width: width as u32,
        height: height as u32,
        channels: 3,
        data: data as *mut u8,
    }
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

/// A required string argument.
unsafe fn text(p: *const c_char, what: &str) -> Result<String, Fail> {
    opt_text(p, what)?.ok_or_else(|| invalid(format!("{what} is null")))
}

/// An optional string argument (null: None).
unsafe fn opt_text(p: *const c_char, what: &str) -> Result<Option<String>, Fail> {
    if p.is_null() {
        return Ok(None);
    }
    // Safety: the caller passes a NUL-terminated string (the header's contract).
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map(|s| Some(s.to_string()))
        .map_err(|_| invalid(format!("{what} is not valid UTF-8")))
}

unsafe fn opt_path(p: *const c_char, what: &str) -> Result<Option<PathBuf>, Fail> {
    Ok(opt_text(p, what)?.map(PathBuf::from))
}

/// A struct pointer whose `size` covers this version's fields.
unsafe fn options<'a, T>(p: *const T, size: impl Fn(&T) -> u32, what: &str) -> Result<&'a T, Fail> {
    if p.is_null() {
        return Err(invalid(format!("{what} is null")));
    }
    // Safety: non-null, and the caller passes a valid struct (the header's contract).
    let o = unsafe { &*p };
    let need = std::mem::size_of::<T>() as u32;
    if size(o) < need {
        return Err(invalid(format!(
            "{what}.size is {} but this library needs {need} (set it to sizeof({what}))",
            size(o)
        )));
    }
    Ok(o)
}

/// The bytes of a caller image, refused before anything is read or allocated when a side is 0 or
/// over `MAX_SIDE` (as the output's sides: 16384² RGB is 3 GiB as floats, and a larger claim is
/// a mistake that would abort the process when its tensor could not be allocated).
fn image_len(img: &toffee_image, what: &str) -> Result<usize, Fail> {
    let (w, h) = (img.width as usize, img.height as usize);
    if !(1..=MAX_SIDE).contains(&w) || !(1..=MAX_SIDE).contains(&h) {
        return Err(invalid(format!(
            "{what} is {w}x{h} pixels: each side must be 1 to {MAX_SIDE}"
        )));
    }
    w.checked_mul(h)
        .and_then(|p| p.checked_mul(img.channels as usize))
        .ok_or_else(|| invalid(format!("{what} is {w}x{h} pixels: too large")))
}

/// A caller image as a [1, H, W, C] tensor in [0, 1].
unsafe fn image_tensor(
    p: *const toffee_image,
    what: &str,
    channels: u32,
) -> Result<Option<Tensor>, Fail> {
    if p.is_null() {
        return Ok(None);
    }
    // Safety: non-null; the header requires data to hold width·height·channels bytes.
    let img = unsafe { &*p };
    if img.channels != channels {
        return Err(invalid(format!(
            "{what} has {} channels, expected {channels}",
            img.channels
        )));
    }
    let n = image_len(img, what)?;
    if img.data.is_null() {
        return Err(invalid(format!("{what}.data is null")));
    }
    // Safety: data holds n bytes (checked above against the declared size; the caller's contract).
    let bytes = unsafe { std::slice::from_raw_parts(img.data, n) };
    Ok(Some(Tensor::new(
        vec![
            1,
            img.height as usize,
            img.width as usize,
            channels as usize,
        ],
        bytes.iter().map(|&b| b as f32 / 255.0).collect(),
    )))
}

/// The same 8-bit conversion as the CLI's image files (ties to even, as numpy).
fn to_bytes(t: &Tensor) -> Vec<u8> {
    t.data()
        .iter()
        .map(|&v| crate::image_io::quantize(v))
        .collect()
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

/// The strings of toffee_engine_options, read and checked before anything loads.
struct EnginePaths {
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
    unsafe fn read(o: &toffee_engine_options) -> Result<EnginePaths, Fail> {
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
fn open_engine(p: &EnginePaths) -> Result<toffee_engine, Fail> {
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
fn check_sample_size(model: &Path, what: &str, default: usize) -> Result<(), Fail> {
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
fn check_default_size(side: usize, what: &str) -> Result<(), Fail> {
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

/// The most images one call makes: the C ABI runs a call's images as one batch, and this is
/// `request::Settings`' bound on a batch (refused here naming the field the caller set).
const MAX_IMAGES_PER_CALL: u32 = 4_096;

/// The most pixels of one call's images together: they are held at once as floats, and one
/// 16384² image (3 GiB) is the most a call may hold, as `request::MAX_SIDE` bounds one side.
const MAX_PIXELS_PER_CALL: usize = MAX_SIDE * MAX_SIDE;

/// The numbers of a generation request, checked (sizes and counts bounded) before any image of
/// the request is read or allocated.
fn generate_settings(o: &toffee_generate_options) -> Result<Settings, Fail> {
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
unsafe fn generate_request(e: &Engine, o: &toffee_generate_options) -> Result<Request, Fail> {
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
fn output_bytes(req: &Request) -> Result<usize, Fail> {
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
fn sample(e: &Engine, req: &Request) -> Result<Tensor, Fail> {
    Ok(e.gen.run(req, &mut |_, _| {})?.images)
}

/// The engine's adapter prompt for `adapter_image` (the engine holds at most one adapter).
unsafe fn adapter_prompts(
    e: &Engine,
    o: &toffee_generate_options,
) -> Result<Vec<ImagePrompt>, Fail> {
    let image = unsafe { image_tensor(o.adapter_image, "adapter_image", 3)? };
    match (&e.adapter_encoder, image) {
        (Some(enc), Some(img)) => {
            let a = &e.gen.adapters[0];
            if !o.adapter_scale.is_finite() {
                return Err(invalid(format!(
                    "adapter_scale {} is not a finite number",
                    o.adapter_scale
                )));
            }
            let scale = if o.adapter_scale >= 0.0 {
                o.adapter_scale
            } else {
                a.default_scale
            };
            let rgb = crate::image_io::to_rgb8(&img);
            let layers = e.gen.unet.cross_attention_layers();
            Ok(vec![image_prompt(a, enc, &rgb, scale, layers)?])
        }
        (None, None) => Ok(Vec::new()),
        (Some(_), None) => Err(invalid("the engine has an adapter: give adapter_image")),
        (None, Some(_)) => Err(invalid("adapter_image given but the engine has no adapter")),
    }
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

/// The caller's progress callback after every shard; a non-zero return asks for a stop.
fn progress_callback(
    o: &toffee_pairs_options,
    stop: Arc<AtomicBool>,
) -> dataset::run::ShardCallback {
    let (progress, user) = (o.progress, o.user as usize);
    Arc::new(move |done, total| {
        if let Some(f) = progress {
            // Safety: the caller's callback with its own user pointer.
            if unsafe { f(user as *mut c_void, done as u64, total as u64) } != 0 {
                stop.store(true, Ordering::SeqCst);
            }
        }
    })
}

/// Polls the caller's cancellation flag into `stop` until dropped (then joined).
struct CancelWatcher {
    finished: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CancelWatcher {
    fn spawn(cancel: usize, stop: Arc<AtomicBool>) -> CancelWatcher {
        let finished = Arc::new(AtomicBool::new(false));
        let done = finished.clone();
        let thread = std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                // Safety: readable for the duration of the call (the contract).
                if unsafe { std::ptr::read_volatile(cancel as *const i32) } != 0 {
                    stop.store(true, Ordering::SeqCst);
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        });
        CancelWatcher {
            finished,
            thread: Some(thread),
        }
    }
}

impl Drop for CancelWatcher {
    fn drop(&mut self) {
        self.finished.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
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
