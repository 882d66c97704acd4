//! The engines and images handed to C, by handle: a `toffee_engine *` is a key into a table,
//! never an address that is followed, and image data is freed only if the engine made it.

use super::*;

/// The message of every call given a handle that is not an open engine.
pub(super) const NOT_AN_ENGINE: &str = "engine is closed or not an engine";

/// The open engines by handle. The `toffee_engine *` a caller holds is only a key here, never
/// dereferenced: a closed, never-opened or made-up handle is found missing instead of read as
/// freed or foreign memory. Each call clones the `Arc`, so a close on another thread frees the
/// engine only when that call returns.
pub(super) static ENGINES: Mutex<BTreeMap<usize, Arc<toffee_engine>>> = Mutex::new(BTreeMap::new());

/// The next handle. Handles are never reused (a stale one cannot reach a newer engine, as a
/// reused address could); they start at 1, as null is "no engine".
pub(super) static NEXT_HANDLE: AtomicUsize = AtomicUsize::new(1);

/// The data of every image the engine handed out (address → length): `toffee_image_free` frees
/// only these, with the length allocated, whatever the caller's struct says by then.
pub(super) static IMAGES: Mutex<BTreeMap<usize, usize>> = Mutex::new(BTreeMap::new());

/// A registry's map; nothing panics while holding one, but a poisoned lock must not turn every
/// later call into a panic.
pub(super) fn registry<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Registers an engine and returns its new handle.
pub(super) fn register_engine(engine: toffee_engine) -> Result<*mut toffee_engine, Fail> {
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
pub(super) fn engine(e: *const toffee_engine) -> Result<Arc<toffee_engine>, Fail> {
    if e.is_null() {
        return Err(invalid("engine is null"));
    }
    let found = registry(&ENGINES).get(&e.addr()).cloned();
    found.ok_or_else(|| invalid(NOT_AN_ENGINE))
}

/// Takes an engine out of the registry; the engine is dropped when the last call using it ends.
pub(super) fn unregister_engine(e: *const toffee_engine) -> Result<Arc<toffee_engine>, Fail> {
    let removed = registry(&ENGINES).remove(&e.addr());
    removed.ok_or_else(|| invalid(NOT_AN_ENGINE))
}

/// An RGB8 image for the caller; its data is registered for `toffee_image_free`.
pub(super) fn engine_image(width: usize, height: usize, bytes: Vec<u8>) -> toffee_image {
    let data = Box::into_raw(bytes.into_boxed_slice());
    registry(&IMAGES).insert(data.addr(), data.len());
    toffee_image {
        width: width as u32,
        height: height as u32,
        channels: 3,
        data: data as *mut u8,
    }
}
