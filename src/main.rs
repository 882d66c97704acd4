//! The `toffee` command line: parses the arguments and hands each subcommand to its module in
//! `toffee::cmd` (its flags and what it prints live there).

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use toffee::cmd;
use toffee::generate::Mode;

#[derive(Parser)]
#[command(
    name = "toffee",
    version,
    about = "Inference engine for Toffee-style subject-driven dataset construction"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Write a Chrome trace (chrome://tracing, ui.perfetto.dev) of the engine's spans: pipeline
    /// stages, model calls, UNet blocks. CUDA builds always emit them as NVTX ranges for nsys.
    #[arg(long, global = true, value_name = "TRACE.json")]
    profile: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one model on named tensors (diffusers' NCHW layout) and write its outputs.
    Forward(cmd::forward::Args),
    /// Text to image. Without --model, a built-in tiny demo model with random weights runs.
    Txt2img(cmd::generate::Args),
    /// Image to image: noise --image to --strength, then denoise towards the prompt.
    Img2img(cmd::generate::Args),
    /// Repaint the white part of --mask (or, for an RGBA --image without --mask, everything
    /// outside its alpha).
    Inpaint(cmd::generate::Args),
    /// List CUDA devices (or why there are none) and the GPU code targets in this build.
    Devices(cmd::devices::Args),
    /// Calls per second of one model on random inputs (random weights of a real configuration).
    Bench(cmd::bench::Args),
    /// Preprocess images and run an image encoder (ViT, DINOv2, CLIP vision): writes
    /// pixel_values and the model's outputs, one row per image in argument order.
    Embed(cmd::embed::Args),
    /// Depth maps with a Depth Anything model: NAME.png (16-bit: relative models min-max
    /// normalised, metric models in millimetres) and NAME.preview.png (8-bit) per image.
    Depth(cmd::depth::Args),
    /// Subject masks from a text: CLIPSeg, optionally sharpened by SAM prompted with the box of
    /// CLIPSeg's mask. Writes an 8-bit PNG (255 = subject) per image and prints one JSON line
    /// per image (area, verdict ok / empty / whole_image, box, SAM IoU). Without --model,
    /// built-in tiny random-weight models run (a demo, not real masks).
    Mask(cmd::mask::Args),
    /// DINO, CLIP-I and CLIP-T scores (raw cosines) of a subject, a target and a prompt, or of
    /// every line of --pairs.
    Score(cmd::score::Args),
    /// Novel views of a subject with a Zero1to3-layout View Generator (one image per pose;
    /// comma-separated angle lists give several views).
    View(cmd::view::Args),
    /// Build a subject-driven dataset: subjects → (view) → placement → Canny → draft → Refiner →
    /// DINO / CLIP scores → WebDataset shards. Resumable; sharded across processes (Slurm job
    /// arrays, Kubernetes indexed Jobs) and GPUs.
    ///
    /// Exit status: 0 when every shard of this process is committed (rejected records are data,
    /// not failures); 1 when a shard failed (rerun the same command: it resumes); 2 for a setup
    /// error — config, subjects, slice, output folder, device or models — found before any work
    /// (fix it first: a rerun fails the same way); 3 when stopped by SIGINT, SIGTERM or SIGHUP
    /// after the batch in flight, 130 when a second signal stopped it at once (either way the
    /// finished shards are intact and no temporary file is left; rerun to continue).
    #[command(args_conflicts_with_subcommands = true)]
    Pairs {
        #[command(subcommand)]
        action: Option<cmd::pairs::Action>,
        #[command(flatten)]
        args: cmd::pairs::Args,
    },
    /// A self-contained HTML page about a pairs output folder: contact sheet, score histograms
    /// with thresholds, rejection reasons, stage time shares.
    Report(cmd::report::Args),
    /// Write a single-file checkpoint (A1111 / ComfyUI layout) as a diffusers folder.
    Convert(cmd::convert::Args),
    /// Describe a checkpoint: family, variant, config, parameter count, dtypes and size.
    Inspect(cmd::inspect::Args),
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Forward(a) => cmd::forward::run(a),
        Cmd::Txt2img(a) => cmd::generate::run(a, Mode::Txt2Img),
        Cmd::Img2img(a) => cmd::generate::run(a, Mode::Img2Img),
        Cmd::Inpaint(a) => cmd::generate::run(a, Mode::Inpaint),
        Cmd::Devices(a) => cmd::devices::run(a),
        Cmd::Bench(a) => cmd::bench::run(a),
        Cmd::Embed(a) => cmd::embed::run(a),
        Cmd::Depth(a) => cmd::depth::run(a),
        Cmd::Mask(a) => cmd::mask::run(a),
        Cmd::Score(a) => cmd::score::run(a),
        Cmd::View(a) => cmd::view::run(a),
        Cmd::Pairs { action, args } => cmd::pairs::run(action, args),
        Cmd::Report(a) => cmd::report::run(a),
        Cmd::Convert(a) => cmd::convert::run(a),
        Cmd::Inspect(a) => cmd::inspect::run(a),
    }
}

fn main() {
    let cli = Cli::parse();
    let profile = match toffee::profile::init(cli.profile.as_deref()) {
        Ok(p) => p,
        Err(e) => {
            // A --profile file that cannot be made: found before any work, like a setup error.
            eprintln!("toffee: error: {e:#}");
            std::process::exit(2);
        }
    };
    let r = run(cli);
    // The trace is complete once the guard is gone.
    drop(profile);
    if let Err(e) = r {
        eprintln!("toffee: error: {e:#}");
        // `pairs`: a setup error (2) will fail again; a failed shard (1) may not, and resumes.
        std::process::exit(if toffee::dataset::is_setup_error(&e) {
            2
        } else {
            1
        });
    }
}
