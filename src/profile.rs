//! Profiling: the engine opens `tracing` spans around pipeline stages, model calls and UNet
//! blocks (named like the model: `text_encoder`, `unet` > `down_block` / `mid_block` /
//! `up_block`, `vae.decode`, the pairs job's `mask`, `view`, `draft`, `refine`, `score`). Nothing
//! listens unless asked, so they cost next to nothing:
//! - `--profile trace.json` writes them as a Chrome trace (chrome://tracing, ui.perfetto.dev) on
//!   any backend;
//! - CUDA builds also turn them into NVTX ranges, so an `nsys profile` timeline reads like the
//!   model (NVTX calls are no-ops unless a tool is attached).
//!
//! The spans time the host: on a GPU, kernels run asynchronously, so a span covers the enqueueing
//! of its work (and any synchronisation inside it), not the kernels' own time; nsys shows both.

use anyhow::{Context, Result};
use std::path::Path;
use tracing_subscriber::prelude::*;

/// Keeps the Chrome trace open; the file is complete once this is dropped.
pub struct ProfileGuard {
    _chrome: Option<tracing_chrome::FlushGuard>,
}

/// Installs the listeners: a Chrome-trace writer to `trace` (when given) and, in CUDA builds, the
/// NVTX ranges. Call once, before any work.
pub fn init(trace: Option<&Path>) -> Result<ProfileGuard> {
    let (chrome, guard) = match trace {
        Some(path) => {
            // Fail here, not at the end of a long run.
            std::fs::File::create(path)
                .with_context(|| format!("--profile {}: cannot create", path.display()))?;
            let (layer, guard) = tracing_chrome::ChromeLayerBuilder::new()
                .file(path)
                .include_args(true)
                .build();
            (Some(layer), Some(guard))
        }
        None => (None, None),
    };
    #[cfg(feature = "cuda")]
    let nvtx = Some(Nvtx);
    #[cfg(not(feature = "cuda"))]
    let nvtx: Option<tracing_subscriber::layer::Identity> = None;
    if chrome.is_some() || nvtx.is_some() {
        tracing_subscriber::registry()
            .with(chrome)
            .with(nvtx)
            .try_init()
            .context("installing the profiler")?;
    }
    Ok(ProfileGuard { _chrome: guard })
}

/// Span enter / exit as NVTX range push / pop on the entering thread.
#[cfg(feature = "cuda")]
struct Nvtx;

#[cfg(feature = "cuda")]
impl<S> tracing_subscriber::Layer<S> for Nvtx
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_enter(&self, id: &tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            nvtx::range_push!("{}", span.name());
        }
    }

    fn on_exit(&self, _id: &tracing::span::Id, _ctx: tracing_subscriber::layer::Context<'_, S>) {
        nvtx::range_pop!();
    }
}
