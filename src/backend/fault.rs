//! A device's sticky failure state. The first failure is kept and every later op becomes a no-op
//! (launching on after a failure would compute on null or stale buffers). An allocation that ran
//! out of memory leaves the device intact, so that failure can be cleared and the work retried
//! with a smaller batch; a failed launch or an asynchronous error cannot.

use anyhow::{anyhow, Result};
use std::sync::Mutex;

#[derive(Default)]
pub struct Fault(Mutex<Option<(String, bool)>>);

impl Fault {
    /// Records `msg` unless a failure is already recorded; `recoverable`: an allocation failure.
    pub fn record(&self, msg: String, recoverable: bool) {
        let mut f = self.0.lock().unwrap();
        if f.is_none() {
            *f = Some((msg, recoverable));
        }
    }

    pub fn is_set(&self) -> bool {
        self.0.lock().unwrap().is_some()
    }

    /// The recorded failure, as an error; an out-of-memory one says how to go on.
    pub fn check(&self) -> Result<()> {
        match &*self.0.lock().unwrap() {
            None => Ok(()),
            Some((m, false)) => Err(anyhow!("{m}")),
            Some((m, true)) => Err(anyhow!(
                "{m} (the device is intact: retry with a smaller batch)"
            )),
        }
    }

    /// Clears a recoverable failure: Ok(true) when one was cleared, Ok(false) when none was
    /// recorded, Err (the failure) when the recorded one is not recoverable.
    pub fn clear_recoverable(&self) -> Result<bool> {
        let mut f = self.0.lock().unwrap();
        match &*f {
            Some((m, false)) => Err(anyhow!("{m}")),
            Some((_, true)) => {
                *f = None;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_failure_sticks_and_only_out_of_memory_clears() {
        let f = Fault::default();
        assert!(f.check().is_ok());
        assert!(!f.clear_recoverable().unwrap(), "nothing to clear");
        f.record("out of memory allocating 512 bytes".into(), true);
        f.record("launching gemm: illegal address".into(), false);
        let e = f.check().unwrap_err().to_string();
        assert!(
            e.contains("out of memory") && e.contains("smaller batch"),
            "{e}"
        );
        assert!(f.clear_recoverable().unwrap());
        assert!(!f.is_set());
        f.record("launching gemm: illegal address".into(), false);
        assert!(f.clear_recoverable().is_err());
        assert!(f.is_set(), "a lost context stays failed");
    }
}
