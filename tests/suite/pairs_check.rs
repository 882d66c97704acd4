//! `toffee pairs --check`: a config and every model folder it names are validated without
//! generating or writing, with the same verdict a run would reach, in seconds even for
//! full-size checkpoints.

use crate::common::{copy_tree, expect_setup_error, fixtures, stdout, toffee};
use std::path::{Path, PathBuf};

/// A pairs config over the fixture folders; `swap` replaces one fixture path by another.
fn config(dir: &Path, name: &str, swap: (&str, &str)) -> PathBuf {
    let f = fixtures();
    let mut models = [
        ("draft", "sd1"),
        ("controlnet", "controlnet-sd1"),
        ("refiner_adapter", "adapters/ip-adapter-sd1.safetensors"),
        ("refiner_adapter_encoder", "vision/clip-vision-proj"),
        ("view", "zero123"),
        ("dino", "vision/dinov2"),
        ("clip", "vision/clip"),
        ("segmenter", "segment_depth/clipseg"),
        ("sam", "segment_depth/sam"),
    ]
    .map(|(k, v)| (k, f.join(v)));
    for m in models.iter_mut() {
        if m.1 == f.join(swap.0) {
            m.1 = if swap.1.starts_with('/') {
                PathBuf::from(swap.1)
            } else {
                f.join(swap.1)
            };
        }
    }
    let mut text = String::from("[models]\n");
    for (k, p) in models {
        text.push_str(&format!("{k} = \"{}\"\n", p.display()));
    }
    text.push_str("[view]\nprobability = 0.5\n[job]\nresolution = 64\n");
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

fn check(cfg: &Path, out: &Path) -> std::process::Output {
    toffee(&[
        "pairs",
        "--check",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])
}

#[test]
fn a_good_recipe_passes_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "good", ("", ""));
    let out = dir.path().join("out");
    let o = check(&cfg, &out);
    let text = stdout(&o);
    assert!(o.status.success(), "{text}{}", crate::common::stderr(&o));
    for stage in [
        "draft",
        "controlnet",
        "refiner_adapter",
        "view",
        "dino",
        "clip",
        "sam",
    ] {
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with(stage) && l.ends_with(": ok")),
            "{stage}: {text}"
        );
    }
    assert!(text.contains("plan: 3 subjects, 12 records"), "{text}");
    assert!(!out.exists(), "--check created the output folder");
}

/// Each mismatched pair of folders fails the check with exit 2 and a message naming the
/// folders, exactly as the run itself fails (before any work, not claiming the folder).
#[test]
fn mismatched_folders_fail_the_check_as_they_fail_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            ("controlnet-sd1", "controlnet-sdxl"),
            vec!["controlnet-sdxl", "made for another UNet", "sd1"],
        ),
        (
            (
                "adapters/ip-adapter-sd1.safetensors",
                "adapters/ip-adapter-sdxl.safetensors",
            ),
            vec!["ip-adapter-sdxl", "an adapter for another UNet"],
        ),
        (
            ("vision/dinov2", "vision/clip"),
            vec!["vision/clip", "needs a DINO model"],
        ),
        (
            ("sd1", "vae-legacy"),
            vec!["vae-legacy", "not a diffusers pipeline folder"],
        ),
        (("zero123", "sd1"), vec!["sd1/image_encoder"]),
    ];
    for (i, (swap, words)) in cases.into_iter().enumerate() {
        let cfg = config(dir.path(), &format!("bad{i}"), swap);
        let out = dir.path().join(format!("out{i}"));
        let e = expect_setup_error(&check(&cfg, &out));
        for w in &words {
            assert!(e.contains(w), "{swap:?}: `{w}` not in {e}");
        }
        let run = toffee(&[
            "pairs",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_eq!(expect_setup_error(&run), e, "{swap:?}: the run disagrees");
        assert!(!out.join("job.json").exists());
    }
    // A missing folder and an unwritable output place.
    let cfg = config(dir.path(), "gone", ("vision/clip", "/nonexistent/clip"));
    let e = expect_setup_error(&check(&cfg, &dir.path().join("o")));
    assert!(e.contains("/nonexistent/clip: no such model"), "{e}");
    let file = dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let cfg = config(dir.path(), "good", ("", ""));
    let e = expect_setup_error(&check(&cfg, &file.join("out")));
    assert!(e.contains("a-file"), "{e}");
}

/// A damaged tensor deep inside a model is found by name, from the header alone.
#[test]
fn a_wrong_tensor_shape_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let cn = dir.path().join("controlnet");
    copy_tree(&fixtures().join("controlnet-sd1"), &cn);
    let file = cn.join("diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let name = "controlnet_mid_block.weight";
    let shape = header[name]["shape"].as_array().unwrap().clone();
    // The same bytes, another shape: [c, c, 1, 1] -> [c, 1, c, 1].
    let swapped = serde_json::json!([shape[0], shape[2], shape[1], shape[3]]);
    assert_ne!(swapped, serde_json::Value::Array(shape));
    header[name]["shape"] = swapped;
    let mut h = serde_json::to_vec(&header).unwrap();
    h.resize(n.max(h.len()), b' ');
    let mut damaged = (h.len() as u64).to_le_bytes().to_vec();
    damaged.extend_from_slice(&h);
    damaged.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&file, damaged).unwrap();
    let cfg = config(
        dir.path(),
        "damaged",
        ("controlnet-sd1", cn.to_str().unwrap()),
    );
    let e = expect_setup_error(&check(&cfg, &dir.path().join("out")));
    assert!(e.contains(name) && e.contains("has shape"), "{e}");
}

/// The recipes in examples/ are valid configs: the check gets past the config and stops at the
/// first model folder that is not downloaded.
#[test]
fn the_example_recipes_parse() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for name in ["pairs-sd15.toml", "pairs-sdxl.toml"] {
        let cfg = root.join("examples").join(name);
        let c = toffee::dataset::config::PairsConfig::read(&cfg).unwrap();
        c.check(name).unwrap();
        assert!(
            c.models.draft.is_some() && c.models.view.is_some(),
            "{name}"
        );
        let dir = tempfile::tempdir().unwrap();
        let e = expect_setup_error(&check(&cfg, &dir.path().join("out")));
        if !c.models.draft.as_ref().unwrap().exists() {
            assert!(e.contains("no such model file or folder"), "{name}: {e}");
        }
    }
}

/// NaN and infinities in the config are refused before any work, naming the field (a NaN
/// guidance would turn guidance off, a NaN threshold would keep nothing; issue 27).
#[test]
fn non_finite_config_numbers_are_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    for (section, line, field) in [
        ("draft", "guidance = nan", "draft.guidance"),
        ("refine", "guidance = inf", "refine.guidance"),
        ("view", "guidance = -inf", "view.guidance"),
        ("draft", "canny_low = nan", "draft.canny_low"),
        ("filter", "dino = nan", "filter.dino"),
        ("filter", "clip_t = inf", "filter.clip_t"),
        ("view", "elevations = [0.0, nan]", "view.elevations"),
        ("refine", "scale = nan", "refine.scale"),
    ] {
        let cfg = dir.path().join("bad.toml");
        std::fs::write(&cfg, format!("[{section}]\n{line}\n")).unwrap();
        let out = dir.path().join("out");
        for check in [true, false] {
            let mut args = vec!["pairs", "--config", cfg.to_str().unwrap()];
            args.extend(["--out", out.to_str().unwrap()]);
            if check {
                args.push("--check");
            }
            let e = expect_setup_error(&toffee(&args));
            assert!(
                e.contains(field) && e.contains("not a finite number"),
                "{line}: {e}"
            );
        }
        assert!(!out.exists(), "{line}: the run started");
    }
}

/// Sizes and counts that would make the job allocate more than any real run needs are refused
/// before any work, by the rules txt2img and the C ABI use, naming the key (issue 27 item 4).
#[test]
fn oversized_config_values_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (section, line, want) in [
        (
            "job",
            "resolution = 1048576",
            "job.resolution 1048576 is larger than 16384",
        ),
        (
            "job",
            "batch = 100000",
            "job.batch 100000 is larger than 4096",
        ),
        (
            "job",
            "prompts_per_subject = 1000000000",
            "job.prompts_per_subject",
        ),
        ("job", "shard_size = 1000000000", "job.shard_size"),
        (
            "draft",
            "steps = 1000000",
            "draft.steps 1000000 is larger than 10000",
        ),
        ("refine", "steps = 0", "refine.steps must be at least 1"),
        (
            "draft",
            "controlnet_scale = nan",
            "draft.controlnet_scale NaN is not a finite",
        ),
        ("view", "steps = 0", "view.steps must be at least 1"),
    ] {
        let cfg = dir.path().join("big.toml");
        std::fs::write(&cfg, format!("[{section}]\n{line}\n")).unwrap();
        let out = dir.path().join("out");
        let args = ["pairs", "--check", "--config", cfg.to_str().unwrap()];
        let e = expect_setup_error(&toffee(
            &[&args[..], &["--out", out.to_str().unwrap()]].concat(),
        ));
        assert!(e.contains(want), "{line}: {e}");
        assert!(!out.exists(), "{line}: the run started");
    }
}

/// Subject names key the records: two subjects with one name (another extension, another case)
/// are an error naming both files, as are empty names and categories (issue 27 item 1).
#[test]
fn colliding_or_empty_subject_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let png = crate::common::fixtures().join("zero123/subject.png");
    let check = |subjects: &Path| {
        let out = dir.path().join("out");
        expect_setup_error(&toffee(&[
            "pairs",
            "--check",
            "--subjects",
            subjects.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]))
    };
    for (i, (a, b)) in [("cup.png", "cup.jpg"), ("Cup.png", "cup.png")]
        .iter()
        .enumerate()
    {
        let folder = dir.path().join(format!("s{i}"));
        std::fs::create_dir(&folder).unwrap();
        std::fs::copy(&png, folder.join(a)).unwrap();
        std::fs::copy(&png, folder.join(b)).unwrap();
        let e = check(&folder);
        assert!(
            e.contains(a) && e.contains(b) && e.contains("same name"),
            "{e}"
        );
    }
    // Two non-UTF-8 file names that decode to the same text (`cup\u{FFFD}`).
    {
        use std::os::unix::ffi::OsStrExt;
        let folder = dir.path().join("bytes");
        std::fs::create_dir(&folder).unwrap();
        for name in [&b"cup\xff.png"[..], &b"cup\xfe.png"[..]] {
            std::fs::copy(&png, folder.join(std::ffi::OsStr::from_bytes(name))).unwrap();
        }
        let e = check(&folder);
        assert!(e.contains("same name"), "{e}");
    }
    let img = png.to_str().unwrap();
    for (line, want) in [
        (
            format!("{{\"image\": \"{img}\", \"name\": \"\"}}"),
            "empty name",
        ),
        (
            format!("{{\"image\": \"{img}\", \"category\": \" \"}}"),
            "empty category",
        ),
    ] {
        let jsonl = dir.path().join("subjects.jsonl");
        std::fs::write(&jsonl, line + "\n").unwrap();
        let e = check(&jsonl);
        assert!(e.contains(want), "{e}");
    }
}
