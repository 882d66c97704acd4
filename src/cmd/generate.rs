//! `toffee txt2img`, `img2img` and `inpaint`: the flags of one generation request, turned into
//! the library's `generate::Options` (files to read) and `request::Settings` (the numbers, whose
//! rules the C ABI and the pairs config share).

use crate::generate::{self, Mode};
use crate::pipeline::request::Settings;
use crate::sched::SchedulerKind;
use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// A diffusers pipeline folder; omitted: the built-in demo model (random weights).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A prompt (repeat for several).
    #[arg(long)]
    pub prompt: Vec<String>,
    /// A file with one prompt per line.
    #[arg(long)]
    pub prompts_file: Option<PathBuf>,
    /// Negative prompt, applied to every prompt.
    #[arg(long)]
    pub negative: Option<String>,
    /// Images per prompt.
    #[arg(long, short = 'n', default_value_t = 1, allow_negative_numbers = true, value_parser = super::count::<usize>)]
    pub images_per_prompt: usize,
    #[arg(long, default_value_t = 20, allow_negative_numbers = true, value_parser = super::count::<usize>)]
    pub steps: usize,
    /// Classifier-free guidance scale (≤ 1 turns guidance off).
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f32,
    /// Override the pipeline's scheduler: ddim, euler, euler-a, dpmpp-2m, dpmpp-2m-karras, pndm.
    #[arg(long)]
    pub scheduler: Option<SchedulerKind>,
    /// Image i uses seed + i, so an image does not depend on the batch it ran in.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true, value_parser = super::count::<u64>)]
    pub seed: u64,
    /// Images per denoising batch.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true, value_parser = super::count::<usize>)]
    pub batch: usize,
    #[arg(long, allow_negative_numbers = true, value_parser = super::count::<usize>)]
    pub width: Option<usize>,
    #[arg(long, allow_negative_numbers = true, value_parser = super::count::<usize>)]
    pub height: Option<usize>,
    /// Output PNG; several images become NAME-0000.png, NAME-0001.png, ….
    #[arg(long, default_value = "out.png")]
    pub out: PathBuf,
    /// A ControlNet model folder.
    #[arg(long)]
    pub controlnet: Option<PathBuf>,
    /// The ControlNet conditioning image.
    #[arg(long)]
    pub control_image: Option<PathBuf>,
    /// ControlNet conditioning scale.
    #[arg(long, default_value_t = 1.0)]
    pub control_scale: f32,
    /// Turn --control-image into Canny edges (thresholds 100/200) first.
    #[arg(long)]
    pub canny: bool,
    /// img2img / inpaint: how far to noise the input image (img2img default 0.8, inpaint 1.0).
    #[arg(long)]
    pub strength: Option<f64>,
    /// Input image (img2img, inpaint); RGBA alpha is the subject mask.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Inpainting mask: white repaints, black keeps. With img2img: change only inside it.
    #[arg(long)]
    pub mask: Option<PathBuf>,
    /// safetensors with `latents` [N, C, H, W]: starting noise (unscaled), as diffusers' `latents`.
    #[arg(long)]
    pub init_latents: Option<PathBuf>,
    /// Write the final latents (before VAE decoding) to this safetensors file as `latents`.
    #[arg(long)]
    pub save_latents: Option<PathBuf>,
    /// cpu, cuda or cuda:N (builds with the `cuda` feature), emu (the software GPU, feature `emu`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Image-prompt adapter: an IP-Adapter .safetensors file or a Toffee adapter folder (repeat
    /// for several; images, scales and encoders pair with them by position).
    #[arg(long)]
    pub adapter: Vec<PathBuf>,
    /// The subject image an adapter conditions on (one per --adapter).
    #[arg(long)]
    pub adapter_image: Vec<PathBuf>,
    /// λ on every cross-attention layer: one for all adapters or one each (default: the
    /// adapter's, else 1).
    #[arg(long)]
    pub adapter_scale: Vec<f32>,
    /// An adapter's image encoder folder (none, or one per --adapter; default: found beside it).
    #[arg(long)]
    pub adapter_encoder: Vec<PathBuf>,
    /// A LoRA fused into the UNet / text encoder weights at load: FILE[:WEIGHT] (diffusers/PEFT
    /// or kohya layout; repeat for several, each with its own weight).
    #[arg(long, value_name = "FILE[:WEIGHT]")]
    pub lora: Vec<crate::weights::lora::LoraSpec>,
}

impl Args {
    pub fn into_options(self, mode: Mode) -> generate::Options {
        let settings = Settings {
            mode,
            images_per_prompt: self.images_per_prompt,
            steps: self.steps,
            guidance: self.guidance,
            scheduler: self.scheduler,
            seed: self.seed,
            batch: self.batch,
            width: self.width,
            height: self.height,
            strength: self.strength,
            control_scale: self.control_scale,
            canny: self.canny,
        };
        generate::Options {
            settings,
            model: self.model,
            prompts: self.prompt,
            prompts_file: self.prompts_file,
            negative: self.negative,
            out: self.out,
            controlnet: self.controlnet,
            control_image: self.control_image,
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

/// txt2img, img2img and inpaint: the same flags, three modes.
pub fn run(args: Args, mode: Mode) -> Result<()> {
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
