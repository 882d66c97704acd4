//! `toffee._toffee.pairs`: the dataset job through the library's runner (`dataset::run`, as
//! `toffee pairs` and `toffee_pairs_run` call it) with its hooks: `on_shard` feeds the progress
//! callback and `stop` is the cancel flag. The run works on its own thread while this one,
//! without the GIL, waits for its events; between them it calls the Python callback and polls
//! for signals, so Ctrl-C (KeyboardInterrupt) sets `stop` like the CLI's first SIGINT: the batch
//! in flight finishes, the unfinished shard's temporaries are removed, the folder stays
//! resumable, and the KeyboardInterrupt is raised once the run has stopped.

use crate::py_result;
use anyhow::{anyhow, Context, Result};
use pyo3::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use toffee::dataset::{self, run::Summary};

/// How often the waiting thread takes the GIL to look for signals (Ctrl-C's latency).
const POLL: Duration = Duration::from_millis(100);

enum Event {
    Shard(usize, usize),
    Done(Box<Result<Summary>>),
}

/// A config given as a dict (JSON from python/toffee), written as TOML where the library's
/// config reader finds it: in the current folder, so its relative paths are relative to the
/// current folder as a user of a dict expects. Removed when dropped.
struct ConfigFile(PathBuf);

impl ConfigFile {
    fn write(json: &str) -> Result<ConfigFile> {
        let value: toml::Value =
            serde_json::from_str(json).context("config: not a TOML-compatible dict")?;
        let text = toml::to_string(&value).context("config: not a TOML-compatible dict")?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = std::env::current_dir().context("config: no current folder")?;
        let path = dir.join(format!(
            ".toffee-pairs-config.{}.{nanos}.toml",
            std::process::id()
        ));
        std::fs::write(&path, text).with_context(|| {
            format!(
                "config: cannot write the dict as TOML to {} (a dict config is read from the current folder)",
                path.display()
            )
        })?;
        Ok(ConfigFile(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The summary as JSON: stats.json's fields, plus what this run built and whether it stopped.
fn summary_json(s: &Summary) -> Result<String> {
    let mut v = serde_json::to_value(&s.stats)?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| anyhow!("the run's stats are not an object"))?;
    obj.insert("shards_built".into(), s.shards_done.into());
    obj.insert("shards_skipped".into(), s.shards_skipped.into());
    obj.insert("stopped".into(), s.stopped.into());
    Ok(v.to_string())
}

/// Runs (or resumes) a pairs job. `config`: a pairs.toml path; `config_json`: a dict's JSON
/// (python/toffee passes one or neither: neither runs the built-in demo). `progress(done,
/// total)` is called on this thread after each shard; a true return stops the run after the
/// batch in flight. Returns the summary as JSON.
#[pyfunction]
#[pyo3(signature = (
    out, *, config=None, config_json=None, subjects=None, templates=None,
    devices=vec!["cpu".to_string()], batch=None, keep_rejected=false, shard_index=None,
    num_shards=None, progress=None, show_progress=false
))]
#[allow(clippy::too_many_arguments)]
pub fn pairs(
    py: Python<'_>,
    out: PathBuf,
    config: Option<PathBuf>,
    config_json: Option<String>,
    subjects: Option<PathBuf>,
    templates: Option<PathBuf>,
    devices: Vec<String>,
    batch: Option<usize>,
    keep_rejected: bool,
    shard_index: Option<usize>,
    num_shards: Option<usize>,
    progress: Option<Py<PyAny>>,
    show_progress: bool,
) -> PyResult<String> {
    if shard_index.is_some() != num_shards.is_some() {
        return py_result(Err(anyhow!("shard_index and num_shards go together")));
    }
    let written = py_result(config_json.as_deref().map(ConfigFile::write).transpose())?;
    let config = written.as_ref().map(|c| c.path().to_path_buf()).or(config);
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = channel();
    // Locked only by this thread; the Mutex makes the receiver shareable with `detach`.
    let rx = Mutex::new(rx);
    let shard_tx = tx.clone();
    let options = dataset::Options {
        config,
        subjects,
        templates,
        out,
        shard_index,
        num_shards,
        devices,
        batch,
        keep_rejected,
        progress: show_progress,
        stop: stop.clone(),
        on_shard: Some(Arc::new(move |done, total| {
            let _ = shard_tx.send(Event::Shard(done, total));
        })),
    };
    let worker = std::thread::spawn(move || {
        let _ = tx.send(Event::Done(Box::new(dataset::run(&options))));
    });
    // The first Python exception (KeyboardInterrupt, or one raised by the callback) stops the
    // run; it is raised after the run has stopped cleanly.
    let mut raised: Option<PyErr> = None;
    let result = loop {
        let event = py.detach(|| rx.lock().ok().map(|r| r.recv_timeout(POLL)));
        match event.unwrap_or(Err(RecvTimeoutError::Disconnected)) {
            Ok(Event::Shard(done, total)) => {
                if let (Some(cb), None) = (&progress, &raised) {
                    match cb.bind(py).call1((done, total)).and_then(|r| r.is_truthy()) {
                        Ok(true) => stop.store(true, Ordering::SeqCst),
                        Ok(false) => {}
                        Err(e) => raised = Some(e),
                    }
                }
            }
            Ok(Event::Done(r)) => break *r,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                break Err(anyhow!(
                    "the pairs run ended without a result (it panicked)"
                ))
            }
        }
        if raised.is_none() {
            raised = py.check_signals().err();
        }
        if raised.is_some() {
            stop.store(true, Ordering::SeqCst);
        }
    };
    let _ = py.detach(|| worker.join());
    drop(written);
    if let Some(e) = raised {
        return Err(e);
    }
    py_result(result.and_then(|s| summary_json(&s)))
}
