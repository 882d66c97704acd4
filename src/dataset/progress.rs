//! The progress bar of a pairs run: records done, pairs/s, kept ratio and ETA (stderr, only on a
//! terminal).

use super::format::Stats;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::Mutex;

pub struct Progress {
    bar: Option<ProgressBar>,
    totals: Mutex<(usize, usize)>,
    records: usize,
}

impl Progress {
    pub fn new(show: bool, records: usize) -> Progress {
        let bar = (show && std::io::stderr().is_terminal()).then(|| {
            let b =
                ProgressBar::with_draw_target(Some(records as u64), ProgressDrawTarget::stderr());
            b.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} records  {per_sec}  {msg}  ETA {eta}",
                )
                .expect("a valid template"),
            );
            b
        });
        Progress {
            bar,
            totals: Mutex::new((0, 0)),
            records,
        }
    }

    /// Counts a finished shard; returns (records done, records to do).
    pub fn shard_done(&self, s: &Stats) -> (usize, usize) {
        let mut t = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        t.0 += s.records + s.skipped_records;
        t.1 += s.kept;
        if let Some(b) = &self.bar {
            b.set_position(t.0 as u64);
            b.set_message(format!(
                "kept {:.0}%",
                100.0 * t.1 as f64 / t.0.max(1) as f64
            ));
        }
        (t.0, self.records)
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
