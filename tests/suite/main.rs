//! The integration tests in one binary (one link instead of one per file; CI time): a module
//! per area, sharing `tests/common`. The GPU suite stays its own binary (`--test gpu`: the
//! software GPU's CI script and the device scripts run it by name).

#[path = "../common/mod.rs"]
mod common;

mod adapters;
mod bad_input;
mod budget;
mod canny;
mod cli;
mod clipseg;
mod depth;
mod ffi;
mod fuzz;
mod fuzz_pairs;
mod generate_cli;
mod hostile;
mod image_io;
mod image_proc;
mod intermediates;
mod lora;
mod mask;
mod merge;
mod nn_ops;
mod pairs;
mod pairs_check;
mod parity;
mod pipelines;
mod precision;
mod real_size;
mod report;
mod sam;
mod sched;
mod sched_ops;
mod single_file;
mod toffee_adapter;
mod tokenizer;
mod view;
mod vision;
