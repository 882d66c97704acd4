//! C values to Rust ones: strings, option structs read up to the caller's `size`, images
//! checked before their pixels are touched.

use super::*;

/// A required string argument.
pub(super) unsafe fn text(p: *const c_char, what: &str) -> Result<String, Fail> {
    opt_text(p, what)?.ok_or_else(|| invalid(format!("{what} is null")))
}

/// An optional string argument (null: None).
pub(super) unsafe fn opt_text(p: *const c_char, what: &str) -> Result<Option<String>, Fail> {
    if p.is_null() {
        return Ok(None);
    }
    // Safety: the caller passes a NUL-terminated string (the header's contract).
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map(|s| Some(s.to_string()))
        .map_err(|_| invalid(format!("{what} is not valid UTF-8")))
}

pub(super) unsafe fn opt_path(p: *const c_char, what: &str) -> Result<Option<PathBuf>, Fail> {
    Ok(opt_text(p, what)?.map(PathBuf::from))
}

/// A struct pointer whose `size` covers this version's fields.
pub(super) unsafe fn options<'a, T>(
    p: *const T,
    size: impl Fn(&T) -> u32,
    what: &str,
) -> Result<&'a T, Fail> {
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
pub(super) fn image_len(img: &toffee_image, what: &str) -> Result<usize, Fail> {
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
pub(super) unsafe fn image_tensor(
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
pub(super) fn to_bytes(t: &Tensor) -> Vec<u8> {
    t.data()
        .iter()
        .map(|&v| crate::image_io::quantize(v))
        .collect()
}
