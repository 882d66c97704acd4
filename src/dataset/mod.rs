//! The pairs job: subjects in, WebDataset shards of (subject, target, prompt, masks) records
//! out — resumable, and sharded across processes and GPUs.
//!
//! The shard is the unit of work, resume and scale-out. Shard i holds records
//! `i·shard_size ..` of a plan every process computes identically (`plan`); process p of N builds
//! the shards with i mod N = p. A shard's tar is written under a temporary name and renamed when
//! complete, then its index lines (`pairs-%06d.jsonl`), then its stats (`pairs-%06d.stats.json`),
//! whose presence marks the shard done. A killed run leaves at most temporary files; a rerun
//! skips the finished shards and redoes the rest, so nothing is lost and nothing is written twice.

pub mod builtin;
pub mod config;
pub mod merge;
pub mod plan;
pub mod progress;
pub mod report;
pub mod run;
pub mod stages;
pub mod writer;

pub use run::{run, Options, Summary};
