//! `toffee pairs --check`: every setup check of a run and nothing else, so a wrong folder is
//! found on a login node in seconds, not after a GPU job has queued. The plan (config values,
//! subjects, templates, slice), the output place (writable, not another job's), the devices, and
//! every model the config names, built as the run builds them from the file headers alone
//! (`weights::shapes_only`): classes and configs, every tensor by name and shape, and the fit
//! between stages (ControlNet and adapter against the UNet, encoders against the adapter).
//! Nothing is written.

use super::job::{resolve, Options};
use super::run::{load_models, open_devices};
use anyhow::Result;
use std::path::PathBuf;
use std::time::Instant;

/// What `check` found good.
pub struct CheckReport {
    /// (stage, path) of every model folder or file the config names.
    pub models: Vec<(&'static str, PathBuf)>,
    pub devices: Vec<String>,
    pub subjects: usize,
    pub records: usize,
    pub shards: usize,
    /// This process's shards.
    pub mine: usize,
    pub seconds: f64,
}

/// Runs every setup check of `o` without generating or writing.
pub fn check(o: &Options) -> Result<CheckReport> {
    let clock = Instant::now();
    let plan = resolve(o)?;
    let devices = open_devices(&o.devices, &plan.cfg)?;
    // Built on the CPU: shapes and the fit between stages do not depend on the device, and the
    // zeros are never uploaded.
    let models =
        crate::weights::shapes_only(|| load_models(&plan.cfg, &crate::backend::Device::Cpu))?;
    // The floors do depend on the device (the CPU holds attention scores a GPU streams).
    for d in &devices {
        models.check_budget(&plan.cfg, d)?;
    }
    let m = &plan.cfg.models;
    let models = [
        ("draft", &m.draft),
        ("controlnet", &m.controlnet),
        ("refiner", &m.refiner),
        ("refiner_adapter", &m.refiner_adapter),
        ("refiner_adapter_encoder", &m.refiner_adapter_encoder),
        ("view", &m.view),
        ("dino", &m.dino),
        ("clip", &m.clip),
        ("segmenter", &m.segmenter),
        ("sam", &m.sam),
    ]
    .into_iter()
    .filter_map(|(stage, p)| Some((stage, p.clone()?)))
    .collect();
    Ok(CheckReport {
        models,
        devices: devices.iter().map(|d| d.name()).collect(),
        subjects: plan.subjects.len(),
        records: plan.records.len(),
        shards: plan.shards,
        mine: plan.mine.len(),
        seconds: clock.elapsed().as_secs_f64(),
    })
}
