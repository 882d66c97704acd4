//! `toffee devices`: what GPUs this process can use, or why none.

use std::fmt::Write;

pub fn report() -> String {
    let mut out = String::new();
    #[cfg(feature = "cuda")]
    {
        use crate::backend::cuda;
        match cuda::list_devices() {
            Ok(list) if list.is_empty() => {
                writeln!(out, "no CUDA devices: the driver reports none").unwrap()
            }
            Ok(list) => {
                for (i, name, (ma, mi), mem) in list {
                    writeln!(
                        out,
                        "cuda:{i}: {name}, compute capability {ma}.{mi}, {:.1} GiB",
                        mem as f64 / (1u64 << 30) as f64
                    )
                    .unwrap();
                }
            }
            Err(e) => writeln!(out, "no CUDA devices: {e:#}").unwrap(),
        }
        writeln!(
            out,
            "embedded kernel targets: {}",
            cuda::embedded_targets().join(", ")
        )
        .unwrap();
    }
    #[cfg(not(feature = "cuda"))]
    writeln!(out, "no CUDA devices: this build has no CUDA backend (rebuild with `--features cuda`)\nembedded kernel targets: none").unwrap();
    #[cfg(feature = "emu")]
    writeln!(
        out,
        "emu: the software GPU (the CUDA backend's kernels compiled for the CPU; for tests, not speed)"
    )
    .unwrap();
    out
}
