//! The memory budget (issue 27 items 4 and 5): sizes that flags or configs claim are compared
//! with a lower bound of what the run would allocate, before it allocates, under `ulimit -v`
//! as a shared node would set it — a clean error naming the request, never an abort.

use crate::common::{copy_tree, filled, fixtures, forward_inputs, toffee_bounded};
use std::path::Path;

fn refused(args: &[&str], env: &[(&str, &str)], names: &str) {
    let (code, e, rss) = crate::common::toffee_bounded(args, env);
    assert_eq!(code, Some(1), "{args:?}: not a clean failure: {e}");
    assert!(
        e.contains("over the memory budget") && e.contains(names),
        "{args:?}: {e}"
    );
    assert!(rss < 4 << 30, "{args:?}: peak RSS {} MB", rss >> 20);
}

#[test]
fn requests_over_the_memory_budget_are_refused_before_allocating() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o.png");
    let o = out.to_str().unwrap();
    let sd1 = fixtures().join("sd1");
    let sd1 = sd1.to_str().unwrap();
    // Within every flag's bound, but 1M latent tokens of attention.
    let big = ["--width", "8192", "--height", "8192"];
    refused(
        &[
            &["txt2img", "--model", sd1, "--prompt", "x", "--out", o][..],
            &big,
        ]
        .concat(),
        &[],
        "a batch of 1 image(s) of 8192×8192",
    );
    for component in ["unet", "vae-decode", "vae-encode"] {
        refused(
            &[
                "bench",
                "--config",
                sd1,
                "--component",
                component,
                "--resolution",
                "8192",
            ],
            &[],
            "at --resolution 8192",
        );
    }
    refused(
        &[
            "bench",
            "--config",
            sd1,
            "--component",
            "unet",
            "--batch",
            "100000000",
        ],
        &[],
        "--batch 100000000",
    );
    // An image processor claiming a 16384² crop.
    let dino = d.path().join("dinov2");
    copy_tree(&fixtures().join("vision/dinov2"), &dino);
    let pp = dino.join("preprocessor_config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&pp).unwrap()).unwrap();
    c["crop_size"] = serde_json::json!({"height": 16384, "width": 16384});
    c["size"] = serde_json::json!({"shortest_edge": 16384});
    std::fs::write(&pp, c.to_string()).unwrap();
    let img = fixtures().join("images/photo.jpg");
    let args = [
        "embed",
        "--model",
        dino.to_str().unwrap(),
        "--images",
        img.to_str().unwrap(),
        "--out",
        o,
    ];
    refused(&args, &[], "image(s) of 16384×16384");
    assert!(!out.exists());
}

/// TOFFEE_MEMORY_BUDGET sets the budget (a small one refuses even the demo); a bad value is an
/// error naming it.
#[test]
fn the_memory_budget_is_configurable() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o.png");
    let o = out.to_str().unwrap();
    let demo = ["txt2img", "--prompt", "x", "--steps", "1", "--out", o];
    refused(
        &demo,
        &[("TOFFEE_MEMORY_BUDGET", "16K")],
        "memory budget of 16.0 KiB",
    );
    let (_, e, _) = toffee_bounded(&demo, &[("TOFFEE_MEMORY_BUDGET", "lots")]);
    assert!(e.contains("TOFFEE_MEMORY_BUDGET=lots"), "{e}");
    let (code, e, _) = toffee_bounded(&demo, &[("TOFFEE_MEMORY_BUDGET", "8G")]);
    assert_eq!(code, Some(0), "{e}");
    assert!(Path::new(o).exists());
}

/// `forward` inputs within the shape bounds whose run would still exceed the budget: a
/// 1024² latent (an 8192² image) through the VAE decoder or the UNet.
#[test]
fn forward_inputs_over_the_memory_budget_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let sd1 = fixtures().join("sd1");
    let out = d.path().join("o.safetensors");
    let cases = [
        (
            "vae-decode",
            vec![("latent", filled(vec![1, 4, 1024, 1024], 0.1))],
            "`latent`",
        ),
        (
            "unet",
            vec![
                ("sample", filled(vec![1, 4, 1024, 1024], 0.1)),
                ("timestep", filled(vec![1], 0.1)),
                ("encoder_hidden_states", filled(vec![1, 77, 16], 0.1)),
            ],
            "`sample`",
        ),
    ];
    for (i, (component, tensors, names)) in cases.into_iter().enumerate() {
        let inp = forward_inputs(d.path(), &format!("in{i}.safetensors"), tensors);
        let args = crate::common::forward_args(&sd1, component, &inp, &out);
        refused(&args, &[], names);
        assert!(!out.exists(), "{component}: wrote an output");
    }
}

/// A pairs job whose job.batch × job.resolution cannot fit the budget is a setup error (exit 2)
/// naming the stage and those fields — from `--check` as from the run, which writes no job.json
/// and no shard — not a failure of every shard on its first batch.
#[test]
fn a_pairs_job_over_the_budget_is_a_setup_error() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let cfg = d.path().join("big.toml");
    std::fs::write(&cfg, "[job]\nbatch = 8\nresolution = 512\n").unwrap();
    let env = [("TOFFEE_MEMORY_BUDGET", "64M")];
    for check in [true, false] {
        let mut args = vec!["pairs", "--config", cfg.to_str().unwrap()];
        args.extend(["--out", out.to_str().unwrap()]);
        if check {
            args.push("--check");
        }
        let (code, e, _) = toffee_bounded(&args, &env);
        assert_eq!(code, Some(2), "check {check}: {e}");
        assert!(
            e.contains("draft: job.batch 8 at job.resolution 512")
                && e.contains("over the memory budget of 64.0 MiB"),
            "check {check}: {e}"
        );
        assert!(!out.join("job.json").exists(), "check {check}");
    }
    // The same config within the budget passes the check.
    let (code, e, _) = toffee_bounded(
        &[
            "pairs",
            "--check",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &[("TOFFEE_MEMORY_BUDGET", "8G")],
    );
    assert_eq!(code, Some(0), "{e}");
}
