//! `toffee._toffee.Scorer`: DINO, CLIP-I and CLIP-T with the CLI's scorer (`cmd::score`'s
//! loading, `pipeline::score::Scorer`), batched as `toffee score --pairs` batches its records,
//! so the numbers are `toffee score`'s. Images are files (read by the CLI's own loaders) or
//! raw RGB pixels; masks are files or one-channel pixels.

use crate::py_result;
use crate::source::{ImageArg, Source};
use anyhow::{bail, Result};
use pyo3::prelude::*;
use std::path::PathBuf;
use toffee::cmd::score::{load_scorer, Options};
use toffee::pipeline::score::ScoreInput;

/// One record, its images not yet decoded.
struct Record {
    subject: Source,
    target: Source,
    prompt: String,
    subject_mask: Option<Source>,
    target_mask: Option<Source>,
}

/// The Python side's record tuple: (subject, target, prompt, subject_mask, target_mask).
type RecordArg<'py> = (
    ImageArg<'py>,
    ImageArg<'py>,
    String,
    Option<ImageArg<'py>>,
    Option<ImageArg<'py>>,
);

impl Record {
    fn read(r: &RecordArg<'_>, i: usize) -> Result<Record> {
        let opt = |a: &Option<ImageArg<'_>>, what: String| {
            a.as_ref().map(|a| Source::read(a, &what)).transpose()
        };
        Ok(Record {
            subject: Source::read(&r.0, &format!("subject[{i}]"))?,
            target: Source::read(&r.1, &format!("target[{i}]"))?,
            prompt: r.2.clone(),
            subject_mask: opt(&r.3, format!("subject_mask[{i}]"))?,
            target_mask: opt(&r.4, format!("target_mask[{i}]"))?,
        })
    }

    /// The scorer's input, decoded as `cmd::score::load_input` decodes a record's files.
    fn load(self, i: usize) -> Result<ScoreInput> {
        let name = self.subject.name(&format!("subject[{i}]"));
        Ok(ScoreInput {
            subject: self.subject.rgb8(&format!("subject[{i}]"))?,
            subject_mask: self
                .subject_mask
                .map(|m| m.mask(&format!("subject_mask[{i}]")))
                .transpose()?,
            target: self.target.rgb8(&format!("target[{i}]"))?,
            target_mask: self
                .target_mask
                .map(|m| m.mask(&format!("target_mask[{i}]")))
                .transpose()?,
            prompt: self.prompt,
            name,
        })
    }
}

/// Scores `records` in chunks of `batch` (`toffee score --pairs --batch`): (dino, clip_i, clip_t)
/// per record, in order.
fn score_records(
    scorer: &toffee::pipeline::score::Scorer,
    records: Vec<Record>,
    batch: usize,
) -> Result<Vec<(f32, f32, f32)>> {
    if batch == 0 {
        bail!("batch must be at least 1");
    }
    let mut out = Vec::with_capacity(records.len());
    let mut records = records.into_iter().enumerate().peekable();
    while records.peek().is_some() {
        let inputs = records
            .by_ref()
            .take(batch)
            .map(|(i, r)| r.load(i))
            .collect::<Result<Vec<_>>>()?;
        out.extend(
            scorer
                .score(&inputs)?
                .into_iter()
                .map(|s| (s.dino, s.clip_i, s.clip_t)),
        );
    }
    Ok(out)
}

#[pyclass(frozen, module = "toffee._toffee")]
pub struct Scorer {
    inner: toffee::pipeline::score::Scorer,
}

#[pymethods]
impl Scorer {
    /// Loads the DINO (v1 or v2) and CLIP folders on `device`, as `toffee score` does.
    #[new]
    #[pyo3(signature = (dino, clip, device="cpu".to_string()))]
    fn new(py: Python<'_>, dino: PathBuf, clip: PathBuf, device: String) -> PyResult<Scorer> {
        let loaded = py.detach(|| load_scorer(&Options { dino, clip, device }));
        Ok(Scorer {
            inner: py_result(loaded)?,
        })
    }

    /// Scores records (subject, target, prompt, subject_mask, target_mask) in batches of `batch`.
    #[pyo3(signature = (records, batch=16))]
    fn score(
        &self,
        py: Python<'_>,
        records: Vec<RecordArg<'_>>,
        batch: usize,
    ) -> PyResult<Vec<(f32, f32, f32)>> {
        let owned = records
            .iter()
            .enumerate()
            .map(|(i, r)| Record::read(r, i))
            .collect::<Result<Vec<_>>>();
        let owned = py_result(owned)?;
        let scorer = &self.inner;
        py_result(py.detach(|| score_records(scorer, owned, batch)))
    }
}
