//! The `toffee` command line: thin over the library.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use toffee::forward::{self, Component};
use toffee::generate::{self, Mode};
use toffee::sched::SchedulerKind;

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
    Forward {
        /// A diffusers pipeline folder or a model folder (config.json + safetensors).
        #[arg(long)]
        model: PathBuf,
        #[arg(long, value_enum)]
        component: Component,
        /// safetensors file with the input tensors.
        #[arg(long)]
        inputs: PathBuf,
        /// safetensors file to write the outputs to (written atomically).
        #[arg(long)]
        out: PathBuf,
        /// cpu, cuda or cuda:N (builds with the `cuda` feature), emu (the software GPU, feature `emu`).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Image-prompt adapter (IP-Adapter .safetensors file or Toffee adapter folder) attached
        /// to the UNet; repeat for several. Inputs ip_image_embeds.{i}, ip_scale.{i} or
        /// ip_layer_scales.{i}.
        #[arg(long)]
        adapter: Vec<PathBuf>,
    },
    /// Text to image. Without --model, a built-in tiny demo model with random weights runs.
    Txt2img(GenArgs),
    /// Image to image: noise --image to --strength, then denoise towards the prompt.
    Img2img(GenArgs),
    /// Repaint the white part of --mask (or, for an RGBA --image without --mask, everything
    /// outside its alpha).
    Inpaint(GenArgs),
    /// List CUDA devices (or why there are none) and the GPU code targets in this build.
    Devices,
    /// Calls per second of one model on random inputs (random weights of a real configuration).
    Bench {
        /// sd15, sd21, sdxl, zero123, dinov2-b14, clip-l14 (random weights) or a pipeline / model folder.
        #[arg(long)]
        config: toffee::bench::Source,
        #[arg(long, value_enum)]
        component: Component,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Image side in pixels (default: the configuration's native size).
        #[arg(long)]
        resolution: Option<usize>,
        /// cpu, cuda, cuda:N or emu.
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long, default_value_t = 10)]
        iters: usize,
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// One JSON object instead of a line of text.
        #[arg(long)]
        json: bool,
    },
    /// Preprocess images and run an image encoder (ViT, DINOv2, CLIP vision): writes
    /// pixel_values and the model's outputs, one row per image in argument order.
    Embed {
        /// An image-encoder folder (with its preprocessor_config.json), a CLIPModel folder or a
        /// pipeline with an image_encoder.
        #[arg(long)]
        model: PathBuf,
        /// PNG / JPEG files.
        #[arg(long, num_args = 1.., required = true)]
        images: Vec<PathBuf>,
        /// safetensors file to write (atomically).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Depth maps with a Depth Anything model: NAME.png (16-bit: relative models min-max
    /// normalised, metric models in millimetres) and NAME.preview.png (8-bit) per image.
    Depth {
        /// A Depth Anything folder (config.json, safetensors, preprocessor_config.json);
        /// without it a built-in tiny random-weight model runs (a demo, not real depth).
        #[arg(long)]
        model: Option<PathBuf>,
        /// One image (with --out).
        #[arg(long, conflicts_with = "images", required_unless_present = "images")]
        image: Option<PathBuf>,
        /// Several images or folders of images (with --out-dir).
        #[arg(long, num_args = 1..)]
        images: Vec<PathBuf>,
        /// The 16-bit depth PNG for --image; the preview goes beside it as NAME.preview.png.
        #[arg(
            long,
            requires = "image",
            default_value_if("image", clap::builder::ArgPredicate::IsPresent, "depth.png")
        )]
        out: Option<PathBuf>,
        /// Output folder for --images: DIR/<image stem>.png and .preview.png.
        #[arg(long, conflicts_with = "image", required_unless_present = "image")]
        out_dir: Option<PathBuf>,
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Subject masks from a text: CLIPSeg, optionally sharpened by SAM prompted with the box of
    /// CLIPSeg's mask. Writes an 8-bit PNG (255 = subject) per image and prints one JSON line
    /// per image (area, verdict ok / empty / whole_image, box, SAM IoU). Without --model,
    /// built-in tiny random-weight models run (a demo, not real masks).
    Mask {
        /// A CLIPSeg folder (CLIPSegForImageSegmentation, tokenizer, preprocessor config).
        #[arg(long)]
        model: Option<PathBuf>,
        /// A SAM folder (SamModel): refines CLIPSeg's mask from its bounding box.
        #[arg(long)]
        sam: Option<PathBuf>,
        /// With the built-in CLIPSeg (no --model): also run the built-in SAM.
        #[arg(long, conflicts_with = "sam")]
        builtin_sam: bool,
        /// One image (with --out).
        #[arg(long, conflicts_with = "images", required_unless_present = "images")]
        image: Option<PathBuf>,
        /// Several images or folders of images (with --out-dir).
        #[arg(long, num_args = 1..)]
        images: Vec<PathBuf>,
        /// What to find ("a teapot"); default: each image's file name (red_teapot.png -> "red
        /// teapot").
        #[arg(long)]
        text: Option<String>,
        /// CLIPSeg probability above which a pixel is the subject.
        #[arg(long, default_value_t = 0.5)]
        threshold: f32,
        /// The mask PNG for --image.
        #[arg(
            long,
            requires = "image",
            default_value_if("image", clap::builder::ArgPredicate::IsPresent, "mask.png")
        )]
        out: Option<PathBuf>,
        /// Output folder for --images: DIR/<image stem>.png.
        #[arg(long, conflicts_with = "image", required_unless_present = "image")]
        out_dir: Option<PathBuf>,
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// DINO, CLIP-I and CLIP-T scores (raw cosines) of a subject, a target and a prompt, or of
    /// every line of --pairs.
    Score {
        /// DINO v1 (ViTModel) or DINOv2 folder.
        #[arg(long)]
        dino: PathBuf,
        /// CLIPModel folder (vision and text towers, tokenizer, preprocessor_config.json).
        #[arg(long)]
        clip: PathBuf,
        #[arg(long, required_unless_present = "pairs", conflicts_with = "pairs")]
        subject: Option<PathBuf>,
        #[arg(long, required_unless_present = "pairs", conflicts_with = "pairs")]
        target: Option<PathBuf>,
        /// Score the subject inside this mask only (white = subject).
        #[arg(long, conflicts_with = "pairs")]
        subject_mask: Option<PathBuf>,
        #[arg(long, conflicts_with = "pairs")]
        target_mask: Option<PathBuf>,
        #[arg(long, required_unless_present = "pairs", conflicts_with = "pairs")]
        prompt: Option<String>,
        /// JSONL: {"subject", "target", "prompt"[, "subject_mask", "target_mask"]} per line
        /// (paths relative to the file); writes one JSON line per record with the scores.
        #[arg(long)]
        pairs: Option<PathBuf>,
        /// With --pairs: write the scored lines here (atomically) instead of stdout.
        #[arg(long, requires = "pairs")]
        out: Option<PathBuf>,
        /// Records per encoder batch.
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// One JSON object instead of a line of text.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Novel views of a subject with a Zero1to3-layout View Generator (one image per pose;
    /// comma-separated angle lists give several views).
    View {
        /// A Zero1to3 pipeline folder (unet, vae, image_encoder, cc_projection, scheduler).
        #[arg(long)]
        model: PathBuf,
        /// The subject; its alpha channel (or --mask) composites it on white first.
        #[arg(long)]
        image: PathBuf,
        /// White = subject (instead of the image's alpha).
        #[arg(long)]
        mask: Option<PathBuf>,
        /// Polar (elevation) change in degrees, e.g. 0 or 10,-10.
        #[arg(
            long,
            value_delimiter = ',',
            allow_hyphen_values = true,
            required = true
        )]
        elevation: Vec<f32>,
        /// Azimuth change in degrees, e.g. 0,90,180,270.
        #[arg(
            long,
            value_delimiter = ',',
            allow_hyphen_values = true,
            required = true
        )]
        azimuth: Vec<f32>,
        /// Camera distance change.
        #[arg(
            long,
            value_delimiter = ',',
            allow_hyphen_values = true,
            default_value = "0"
        )]
        radius: Vec<f32>,
        #[arg(long, default_value_t = 50)]
        steps: usize,
        #[arg(long, default_value_t = 3.0)]
        guidance: f32,
        /// Override the pipeline's scheduler.
        #[arg(long)]
        scheduler: Option<SchedulerKind>,
        /// View i uses seed + i.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Views per UNet batch.
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// Output PNG; several views become NAME-0000.png, ….
        #[arg(long, default_value = "view.png")]
        out: PathBuf,
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Build a subject-driven dataset: subjects → (view) → placement → Canny → draft → Refiner →
    /// DINO / CLIP scores → WebDataset shards. Resumable; sharded across processes (Slurm job
    /// arrays, Kubernetes indexed Jobs) and GPUs.
    ///
    /// Exit status: 0 when every shard of this process is committed (rejected records are data,
    /// not failures); 1 for a setup error or a failed shard (rerun the same command: it resumes);
    /// 3 when stopped by Ctrl-C (finished shards are intact; rerun to continue).
    #[command(args_conflicts_with_subcommands = true)]
    Pairs {
        #[command(subcommand)]
        action: Option<PairsCmd>,
        #[command(flatten)]
        args: PairsArgs,
    },
    /// A self-contained HTML page about a pairs output folder: contact sheet, score histograms
    /// with thresholds, rejection reasons, stage time shares.
    Report {
        dir: PathBuf,
        #[arg(long, default_value = "report.html")]
        out: PathBuf,
    },
    /// Write a single-file checkpoint (A1111 / ComfyUI layout) as a diffusers folder.
    Convert {
        /// The .safetensors file (SD 1.x / 2.x / XL, a ControlNet or a VAE).
        file: PathBuf,
        /// A new (or empty) folder.
        #[arg(long)]
        out: PathBuf,
    },
    /// Describe a checkpoint: family, variant, config, parameter count, dtypes and size.
    Inspect {
        /// A pipeline folder, a model folder or a .safetensors file.
        path: PathBuf,
        /// Also build the model, reading and checking every tensor.
        #[arg(long)]
        load: bool,
    },
}

#[derive(Subcommand)]
enum PairsCmd {
    /// Check a finished multi-process run (every shard done, every record once, no key twice)
    /// and write the combined index.jsonl and stats.json.
    Merge { dir: PathBuf },
}

#[derive(clap::Args)]
struct PairsArgs {
    /// pairs.toml (see --print-config); without it, built-in tiny models run every stage.
    #[arg(long)]
    config: Option<PathBuf>,
    /// A folder of subject images (mask: alpha, or NAME.mask.png) or a JSONL list of
    /// {"image", "mask", "name", "category"}; default: built-in drawn subjects.
    #[arg(long)]
    subjects: Option<PathBuf>,
    /// Prompt templates, one per line with {subject} (optionally `taxonomy<TAB>template`).
    #[arg(long)]
    templates: Option<PathBuf>,
    /// Output folder (shards, index.jsonl, stats.json, job.json).
    #[arg(long, required_unless_present = "print_config")]
    out: Option<PathBuf>,
    /// This process's slice; default from SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT or
    /// JOB_COMPLETION_INDEX/TOFFEE_NUM_SHARDS, else 0 of 1.
    #[arg(long, requires = "num_shards")]
    shard_index: Option<usize>,
    #[arg(long, requires = "shard_index")]
    num_shards: Option<usize>,
    /// One worker per device: cpu, cuda:0,cuda:1, …
    #[arg(long, value_delimiter = ',', default_value = "cpu")]
    devices: Vec<String>,
    /// Records per model batch (overrides job.batch).
    #[arg(long)]
    batch: Option<usize>,
    /// Also write rejected records (with their scores) into the shards.
    #[arg(long)]
    keep_rejected: bool,
    /// Print the default configuration and exit.
    #[arg(long)]
    print_config: bool,
    /// Print per-stage seconds and pairs per hour as JSON when done.
    #[arg(long)]
    bench: bool,
}

#[derive(clap::Args)]
struct GenArgs {
    /// A diffusers pipeline folder; omitted: the built-in demo model (random weights).
    #[arg(long)]
    model: Option<PathBuf>,
    /// A prompt (repeat for several).
    #[arg(long)]
    prompt: Vec<String>,
    /// A file with one prompt per line.
    #[arg(long)]
    prompts_file: Option<PathBuf>,
    /// Negative prompt, applied to every prompt.
    #[arg(long)]
    negative: Option<String>,
    /// Images per prompt.
    #[arg(long, short = 'n', default_value_t = 1)]
    images_per_prompt: usize,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Classifier-free guidance scale (≤ 1 turns guidance off).
    #[arg(long, default_value_t = 7.5)]
    guidance: f32,
    /// Override the pipeline's scheduler: ddim, euler, euler-a, dpmpp-2m, dpmpp-2m-karras, pndm.
    #[arg(long)]
    scheduler: Option<SchedulerKind>,
    /// Image i uses seed + i, so an image does not depend on the batch it ran in.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Images per denoising batch.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    /// Output PNG; several images become NAME-0000.png, NAME-0001.png, ….
    #[arg(long, default_value = "out.png")]
    out: PathBuf,
    /// A ControlNet model folder.
    #[arg(long)]
    controlnet: Option<PathBuf>,
    /// The ControlNet conditioning image.
    #[arg(long)]
    control_image: Option<PathBuf>,
    /// ControlNet conditioning scale.
    #[arg(long, default_value_t = 1.0)]
    control_scale: f32,
    /// Turn --control-image into Canny edges (thresholds 100/200) first.
    #[arg(long)]
    canny: bool,
    /// img2img / inpaint: how far to noise the input image (img2img default 0.8, inpaint 1.0).
    #[arg(long)]
    strength: Option<f64>,
    /// Input image (img2img, inpaint); RGBA alpha is the subject mask.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Inpainting mask: white repaints, black keeps. With img2img: change only inside it.
    #[arg(long)]
    mask: Option<PathBuf>,
    /// safetensors with `latents` [N, C, H, W]: starting noise (unscaled), as diffusers' `latents`.
    #[arg(long)]
    init_latents: Option<PathBuf>,
    /// Write the final latents (before VAE decoding) to this safetensors file as `latents`.
    #[arg(long)]
    save_latents: Option<PathBuf>,
    /// cpu, cuda or cuda:N (builds with the `cuda` feature), emu (the software GPU, feature `emu`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Image-prompt adapter: an IP-Adapter .safetensors file or a Toffee adapter folder (repeat
    /// for several; images, scales and encoders pair with them by position).
    #[arg(long)]
    adapter: Vec<PathBuf>,
    /// The subject image an adapter conditions on (one per --adapter).
    #[arg(long)]
    adapter_image: Vec<PathBuf>,
    /// λ on every cross-attention layer: one for all adapters or one each (default: the
    /// adapter's, else 1).
    #[arg(long)]
    adapter_scale: Vec<f32>,
    /// An adapter's image encoder folder (none, or one per --adapter; default: found beside it).
    #[arg(long)]
    adapter_encoder: Vec<PathBuf>,
    /// A LoRA fused into the UNet / text encoder weights at load: FILE[:WEIGHT] (diffusers/PEFT
    /// or kohya layout; repeat for several, each with its own weight).
    #[arg(long, value_name = "FILE[:WEIGHT]")]
    lora: Vec<toffee::weights::lora::LoraSpec>,
}

impl GenArgs {
    fn into_options(self, mode: Mode) -> generate::Options {
        generate::Options {
            mode,
            model: self.model,
            prompts: self.prompt,
            prompts_file: self.prompts_file,
            negative: self.negative,
            images_per_prompt: self.images_per_prompt,
            steps: self.steps,
            guidance: self.guidance,
            scheduler: self.scheduler,
            seed: self.seed,
            batch: self.batch,
            width: self.width,
            height: self.height,
            out: self.out,
            controlnet: self.controlnet,
            control_image: self.control_image,
            control_scale: self.control_scale,
            canny: self.canny,
            strength: self.strength,
            image: self.image,
            mask: self.mask,
            init_latents: self.init_latents,
            save_latents: self.save_latents,
            progress: true,
            device: self.device,
            adapter: self.adapter,
            adapter_image: self.adapter_image,
            adapter_scale: self.adapter_scale,
            adapter_encoder: self.adapter_encoder,
            loras: self.lora,
        }
    }
}

fn generate(args: GenArgs, mode: Mode) -> Result<()> {
    let s = generate::run(&args.into_options(mode))?;
    let n = s.paths.len();
    let names = if n == 1 {
        s.paths[0].display().to_string()
    } else {
        format!("{} … {}", s.paths[0].display(), s.paths[n - 1].display())
    };
    eprintln!(
        "wrote {n} image{} ({names}) in {:.2} s: {:.2} images/s",
        if n == 1 { "" } else { "s" },
        s.seconds,
        n as f64 / s.seconds
    );
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Forward {
            model,
            component,
            inputs,
            out,
            device,
            adapter,
        } => {
            let device =
                toffee::models::load::open_device(&device, Some(&model), component.subfolder())?;
            let tensors = toffee::weights::safetensors::read_all(&inputs)?;
            let outputs = forward::run_with_adapters(
                &model, component, &tensors, &inputs, &device, &adapter,
            )?;
            toffee::weights::safetensors::write_f32(&out, &outputs)?;
            let names: Vec<&str> = outputs.iter().map(|(n, _)| n.as_str()).collect();
            eprintln!("wrote {} ({})", out.display(), names.join(", "));
            Ok(())
        }
        Cmd::Txt2img(a) => generate(a, Mode::Txt2Img),
        Cmd::Img2img(a) => generate(a, Mode::Img2Img),
        Cmd::Inpaint(a) => generate(a, Mode::Inpaint),
        Cmd::Devices => {
            print!("{}", toffee::devices::report());
            Ok(())
        }
        Cmd::Bench {
            config,
            component,
            batch,
            resolution,
            device,
            iters,
            warmup,
            json,
        } => {
            let model = match &config {
                toffee::bench::Source::Dir(p) => Some(p.as_path()),
                toffee::bench::Source::Known(_) | toffee::bench::Source::KnownVision(_) => None,
            };
            let device = toffee::models::load::open_device(&device, model, component.subfolder())?;
            let opts = toffee::bench::Options {
                source: config,
                component,
                batch,
                resolution,
                iters,
                warmup,
            };
            let r = toffee::bench::run(&opts, &device)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{} {} batch {} at {}px on {}: {:.3} ms/call, {:.2} calls/s",
                    r.config,
                    r.component,
                    r.batch,
                    r.resolution,
                    r.device,
                    r.ms_per_call,
                    r.calls_per_s
                );
            }
            Ok(())
        }
        Cmd::Embed {
            model,
            images,
            out,
            device,
        } => {
            let names = toffee::cmd::embed::run(&toffee::cmd::embed::Options {
                model,
                images,
                out: out.clone(),
                device,
            })?;
            eprintln!("wrote {} ({})", out.display(), names.join(", "));
            Ok(())
        }
        Cmd::Depth {
            model,
            image,
            images,
            out,
            out_dir,
            device,
        } => {
            let images = match image {
                Some(i) => vec![i],
                None => images,
            };
            let written = toffee::cmd::depth::run(&toffee::cmd::depth::Options {
                model,
                images,
                out,
                out_dir,
                device,
            })?;
            let n = written.len();
            eprintln!(
                "wrote {n} depth map{} ({}{}) and previews",
                if n == 1 { "" } else { "s" },
                written[0].display(),
                if n > 1 { " …" } else { "" }
            );
            Ok(())
        }
        Cmd::Mask {
            model,
            sam,
            builtin_sam,
            image,
            images,
            text,
            threshold,
            out,
            out_dir,
            device,
        } => {
            let images = match image {
                Some(i) => vec![i],
                None => images,
            };
            let settings = toffee::pipeline::mask::MaskSettings {
                threshold,
                ..Default::default()
            };
            let reports = toffee::cmd::mask::run(&toffee::cmd::mask::Options {
                model,
                sam,
                builtin_sam,
                images,
                text,
                settings,
                out,
                out_dir,
                device,
            })?;
            for r in &reports {
                println!("{}", serde_json::to_string(r)?);
                if r.verdict != toffee::pipeline::mask::MaskVerdict::Ok {
                    eprintln!(
                        "toffee: warning: {}: the mask for `{}` is {} ({:.1}% of the image)",
                        r.image.display(),
                        r.text,
                        match r.verdict {
                            toffee::pipeline::mask::MaskVerdict::Empty => "empty",
                            _ => "the whole image",
                        },
                        100.0 * r.area
                    );
                }
            }
            eprintln!(
                "wrote {} mask{}",
                reports.len(),
                if reports.len() == 1 { "" } else { "s" }
            );
            Ok(())
        }
        Cmd::Score {
            dino,
            clip,
            subject,
            target,
            subject_mask,
            target_mask,
            prompt,
            pairs,
            out,
            batch,
            json,
            device,
        } => {
            use toffee::cmd::score;
            let scorer = score::load_scorer(&score::Options { dino, clip, device })?;
            if let Some(pairs) = pairs {
                let n = match out {
                    Some(out) => {
                        let mut buf = Vec::new();
                        let n = score::score_file(&scorer, &pairs, batch, &mut buf)?;
                        toffee::weights::safetensors::write_atomic(&out, &buf)?;
                        n
                    }
                    None => {
                        score::score_file(&scorer, &pairs, batch, &mut std::io::stdout().lock())?
                    }
                };
                eprintln!("scored {n} record{}", if n == 1 { "" } else { "s" });
                return Ok(());
            }
            let (Some(subject), Some(target), Some(prompt)) = (subject, target, prompt) else {
                anyhow::bail!("--subject, --target and --prompt are required without --pairs");
            };
            let line = score::PairLine {
                subject,
                target,
                prompt,
                subject_mask,
                target_mask,
            };
            let s = score::score_one(&scorer, &line)?;
            if json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                println!(
                    "dino {:.6}  clip_i {:.6}  clip_t {:.6}",
                    s.dino, s.clip_i, s.clip_t
                );
            }
            Ok(())
        }
        Cmd::View {
            model,
            image,
            mask,
            elevation,
            azimuth,
            radius,
            steps,
            guidance,
            scheduler,
            seed,
            batch,
            out,
            device,
        } => {
            let paths = toffee::cmd::view::run(&toffee::cmd::view::Options {
                model,
                image,
                mask,
                elevation,
                azimuth,
                radius,
                steps,
                guidance,
                scheduler,
                seed,
                batch,
                out,
                device,
            })?;
            eprintln!("wrote {} view(s) ({})", paths.len(), paths[0].display());
            Ok(())
        }
        Cmd::Pairs { action, args } => pairs(action, args),
        Cmd::Report { dir, out } => {
            let r = toffee::dataset::report::write_report(&dir, &out)?;
            eprintln!("wrote {} ({r:?})", out.display());
            Ok(())
        }
        Cmd::Convert { file, out } => {
            let c = toffee::cmd::convert::convert(&file, &out)
                .with_context(|| format!("converting {}", file.display()))?;
            eprintln!(
                "wrote {} ({}; {} tensors)",
                out.display(),
                c.components.join(", "),
                c.tensors
            );
            Ok(())
        }
        Cmd::Inspect { path, load } => {
            let text = toffee::inspect::inspect(&path, load)
                .with_context(|| format!("inspecting {}", path.display()))?;
            print!("{text}");
            Ok(())
        }
    }
}

fn pairs(action: Option<PairsCmd>, a: PairsArgs) -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    if let Some(PairsCmd::Merge { dir }) = action {
        let r = toffee::dataset::merge::merge(&dir)?;
        eprintln!(
            "{}: {} shards, {} records ({} kept); wrote index.jsonl and stats.json",
            dir.display(),
            r.shards,
            r.records,
            r.stats.kept
        );
        return Ok(());
    }
    if a.print_config {
        print!("{}", toffee::dataset::config::PairsConfig::default_toml());
        return Ok(());
    }
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    // SIGINT, SIGTERM and SIGHUP (Slurm's time limit and scancel, Kubernetes evictions) stop
    // after the batch in flight; a second one kills the process the usual way.
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("toffee: stopping after the batch in flight (signal again to abort)");
    });
    let out = a.out.expect("clap requires --out");
    let s = toffee::dataset::run(&toffee::dataset::Options {
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
    })?;
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
        println!(
            "{}",
            serde_json::json!({"stage_seconds": s.stats.stage_seconds, "seconds": s.stats.seconds,
                               "records": s.stats.records, "kept": s.stats.kept,
                               "pairs_per_hour": s.stats.pairs_per_hour, "device": s.stats.device,
                               "unet_evaluations": s.stats.unet_evaluations,
                               "unet_evaluations_per_record": s.stats.unet_evaluations as f64 / s.stats.records.max(1) as f64})
        );
    }
    if s.stopped {
        eprintln!("toffee: stopped; rerun the same command to continue");
        std::process::exit(3);
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let profile = match toffee::profile::init(cli.profile.as_deref()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("toffee: error: {e:#}");
            std::process::exit(1);
        }
    };
    let r = run(cli);
    // The trace is complete once the guard is gone.
    drop(profile);
    if let Err(e) = r {
        eprintln!("toffee: error: {e:#}");
        std::process::exit(1);
    }
}
