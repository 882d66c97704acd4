//! `toffee_pairs_run`'s progress callback and its cancellation flag watcher.

use super::*;

/// The caller's progress callback after every shard; a non-zero return asks for a stop.
pub(super) fn progress_callback(
    o: &toffee_pairs_options,
    stop: Arc<AtomicBool>,
) -> dataset::job::ShardCallback {
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
pub(super) struct CancelWatcher {
    finished: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CancelWatcher {
    pub(super) fn spawn(cancel: usize, stop: Arc<AtomicBool>) -> CancelWatcher {
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
