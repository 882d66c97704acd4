//! `toffee pairs`: the dataset job (crate::dataset) from the command line, with Ctrl-C, SIGTERM and
//! SIGHUP as a clean stop.

use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum Action {
    /// Check a finished multi-process run (every shard done, every record once, no key twice)
    /// and write the combined index.jsonl and stats.json.
    Merge(super::merge::Args),
}

#[derive(clap::Args)]
pub struct Args {
    /// pairs.toml (see --print-config); without it, built-in tiny models run every stage.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// A folder of subject images (mask: alpha, or NAME.mask.png) or a JSONL list of
    /// {"image", "mask", "name", "category"}; default: built-in drawn subjects.
    #[arg(long)]
    pub subjects: Option<PathBuf>,
    /// Prompt templates, one per line with {subject} (optionally `taxonomy<TAB>template`).
    #[arg(long)]
    pub templates: Option<PathBuf>,
    /// Output folder (shards, index.jsonl, stats.json, job.json).
    #[arg(long, required_unless_present = "print_config")]
    pub out: Option<PathBuf>,
    /// This process's slice; default from SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT or
    /// JOB_COMPLETION_INDEX/TOFFEE_NUM_SHARDS, else 0 of 1.
    #[arg(long, requires = "num_shards", allow_negative_numbers = true, value_parser = super::count::<usize>)]
    pub shard_index: Option<usize>,
    #[arg(long, requires = "shard_index", allow_negative_numbers = true, value_parser = super::count::<usize>)]
    pub num_shards: Option<usize>,
    /// One worker per device: cpu, cuda:0,cuda:1, …
    #[arg(long, value_delimiter = ',', default_value = "cpu")]
    pub devices: Vec<String>,
    /// Records per model batch (overrides job.batch).
    #[arg(long, allow_negative_numbers = true, value_parser = super::count::<usize>)]
    pub batch: Option<usize>,
    /// Also write rejected records (with their scores) into the shards.
    #[arg(long)]
    pub keep_rejected: bool,
    /// Print the default configuration and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Check the config, the subjects, the output folder, the devices and every model folder
    /// (classes, tensor names and shapes, the fit between stages) without generating or writing
    /// anything; exit 0 when a run would start, 2 when it would not.
    #[arg(long)]
    pub check: bool,
    /// Print per-stage seconds and pairs per hour as JSON when done.
    #[arg(long)]
    pub bench: bool,
}

/// The run, or the action given (`merge`).
pub fn run(action: Option<Action>, a: Args) -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    if let Some(Action::Merge(m)) = action {
        return super::merge::run(m);
    }
    if a.print_config {
        print!("{}", crate::dataset::config::PairsConfig::default_toml());
        return Ok(());
    }
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    // SIGINT, SIGTERM and SIGHUP (Slurm's time limit and scancel, Kubernetes evictions) stop
    // after the batch in flight; a second one exits at once, removing the unfinished shards'
    // temporary files first (the folder stays resumable).
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            crate::atomic_file::remove_live_temporaries();
            eprintln!("toffee: stopped at once; rerun the same command to continue");
            std::process::exit(130);
        }
        eprintln!("toffee: stopping after the batch in flight (signal again to abort)");
    });
    let out = a.out.expect("clap requires --out");
    let check = a.check;
    let o = crate::dataset::Options {
        config: a.config,
        subjects: a.subjects,
        templates: a.templates,
        out: out.clone(),
        shard_index: a.shard_index,
        num_shards: a.num_shards,
        devices: a.devices,
        batch: a.batch,
        keep_rejected: a.keep_rejected,
        progress: true,
        stop,
        on_shard: None,
    };
    if check {
        return print_check(&o);
    }
    let s = crate::dataset::run(&o)?;
    eprintln!(
        "{}: {} shard(s) built, {} already done; {} records in the folder, {} kept, {} rejected",
        out.display(),
        s.shards_done,
        s.shards_skipped,
        s.stats.records,
        s.stats.kept,
        s.stats.rejected
    );
    if a.bench {
        print_bench(&s.stats);
    }
    if s.stopped {
        eprintln!("toffee: stopped; rerun the same command to continue");
        std::process::exit(3);
    }
    Ok(())
}

/// `--check`: the report on stdout; a failure is a setup error (exit 2).
fn print_check(o: &crate::dataset::Options) -> Result<()> {
    let r = crate::dataset::check::check(o)
        .map_err(|e| anyhow::Error::new(crate::dataset::SetupError(e)))?;
    match &o.config {
        Some(c) => println!("config {}: ok", c.display()),
        None => println!("config: none (the built-in demo models)"),
    }
    for (stage, path) in &r.models {
        println!("  {stage:<24} {}: ok", path.display());
    }
    println!("devices: {}", r.devices.join(", "));
    println!(
        "plan: {} subjects, {} records in {} shards ({} for this process)",
        r.subjects, r.records, r.shards, r.mine
    );
    println!("output {}: writable", o.out.display());
    println!(
        "check passed in {:.1} s; nothing was generated or written",
        r.seconds
    );
    Ok(())
}

/// `--bench`: the run's times and throughput as one JSON line.
fn print_bench(s: &crate::dataset::format::Stats) {
    let per_record = s.unet_evaluations as f64 / s.records.max(1) as f64;
    println!(
        "{}",
        serde_json::json!({"stage_seconds": s.stage_seconds, "seconds": s.seconds,
                           "work_seconds": s.work_seconds, "records": s.records, "kept": s.kept,
                           "pairs_per_hour": s.pairs_per_hour, "device": s.device,
                           "unet_evaluations": s.unet_evaluations,
                           "unet_evaluations_per_record": per_record})
    );
}
