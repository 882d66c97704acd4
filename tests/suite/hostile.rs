//! Hostile input (part of the hardening issue): numbers that cannot make a picture are errors,
//! output formats are what the name says, schedules and configs are checked before allocating.

use crate::common::{expect_error, filled, fixtures, forward_inputs, stderr, toffee, txt2img_at};

fn txt2img(out: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let mut a = vec![
        "txt2img",
        "--prompt",
        "a cat",
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--out",
        out.to_str().unwrap(),
    ];
    a.extend_from_slice(extra);
    toffee(&a)
}

#[test]
fn non_finite_values_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.png");
    for (flag, v) in [
        ("--guidance", "nan"),
        ("--guidance", "inf"),
        ("--control-scale", "NaN"),
        ("--adapter-scale", "-inf"),
    ] {
        let arg = format!("{flag}={v}");
        let e = expect_error(&txt2img(&out, &[&arg]));
        assert!(e.contains(flag) && e.contains("finite"), "{flag} {v}: {e}");
    }
    assert!(!out.exists());
}

#[test]
fn output_format_follows_the_extension() {
    let dir = tempfile::tempdir().unwrap();
    let jpg = dir.path().join("o.jpg");
    let o = txt2img(&jpg, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        &std::fs::read(&jpg).unwrap()[..2],
        &[0xff, 0xd8],
        "a JPEG file"
    );
    let png = dir.path().join("o.png");
    assert!(txt2img(&png, &[]).status.success());
    assert_eq!(&std::fs::read(&png).unwrap()[1..4], b"PNG");
    let e = expect_error(&txt2img(&dir.path().join("o.gif"), &[]));
    assert!(e.contains(".gif") && e.contains(".png"), "{e}");
    assert!(!dir.path().join("o.gif").exists());
}

#[test]
fn a_prompts_file_byte_order_mark_is_not_part_of_the_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let with_bom = dir.path().join("bom.txt");
    std::fs::write(&with_bom, "\u{feff}a cat\n").unwrap();
    let plain = dir.path().join("plain.txt");
    std::fs::write(&plain, "a cat\n").unwrap();
    let (a, b) = (dir.path().join("a.png"), dir.path().join("b.png"));
    let run = |f: &std::path::Path, out: &std::path::Path| {
        let o = toffee(&[
            "txt2img",
            "--prompts-file",
            f.to_str().unwrap(),
            "--steps",
            "2",
            "--width",
            "64",
            "--height",
            "64",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
    };
    run(&with_bom, &a);
    run(&plain, &b);
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
}

/// Broken schedules and VAE scaling factors are errors naming the file and the field.
#[test]
fn config_values_that_cannot_work_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("sd1");
    crate::common::copy_tree(&fixtures().join("sd1"), &model);
    let sched = model.join("scheduler/scheduler_config.json");
    let original = std::fs::read_to_string(&sched).unwrap();
    let out = dir.path().join("o.png");
    for (field, value, want) in [
        ("beta_start", "1.5", "beta_start"),
        ("beta_end", "0.00001", "beta_end"),
        ("num_train_timesteps", "1000000000", "num_train_timesteps"),
    ] {
        let mut v: serde_json::Value = serde_json::from_str(&original).unwrap();
        v[field] = serde_json::from_str(value).unwrap();
        std::fs::write(&sched, v.to_string()).unwrap();
        let e = expect_error(&txt2img_at(
            model.to_str().unwrap(),
            out.to_str().unwrap(),
            &["--steps", "2"],
        ));
        assert!(
            e.contains("scheduler_config.json") && e.contains(want),
            "{field}: {e}"
        );
    }
    std::fs::write(&sched, &original).unwrap();
    let vae = model.join("vae/config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&vae).unwrap()).unwrap();
    v["scaling_factor"] = serde_json::json!(0.0);
    std::fs::write(&vae, v.to_string()).unwrap();
    let e = expect_error(&txt2img_at(
        model.to_str().unwrap(),
        out.to_str().unwrap(),
        &["--steps", "2"],
    ));
    assert!(
        e.contains("vae/config.json") && e.contains("scaling_factor"),
        "{e}"
    );
}

/// A non-finite latent stops the run with an error instead of writing a black image.
#[test]
fn non_finite_latents_stop_the_run() {
    use toffee::pipeline::check_finite;
    use toffee::tensor::Tensor;
    let t = Tensor::new(vec![1, 2], vec![0.5, f32::NAN]);
    let e = check_finite(&t, "the latents", 20).unwrap_err().to_string();
    assert!(e.contains("non-finite") && e.contains("20 steps"), "{e}");
    assert!(check_finite(&Tensor::new(vec![1], vec![1.0]), "x", 1).is_ok());
}

#[test]
fn inputs_that_would_be_ignored_or_misplaced_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.png");
    // --canny without a ControlNet.
    let e = expect_error(&txt2img(&out, &["--canny"]));
    assert!(e.contains("--canny"), "{e}");
    // Absurd sizes are refused before anything is allocated.
    let e = expect_error(&toffee(&[
        "txt2img",
        "--prompt",
        "x",
        "--width",
        "1000000",
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(e.contains("--width") && e.contains("1000000"), "{e}");
    let e = expect_error(&toffee(&[
        "txt2img",
        "--prompt",
        "x",
        "--steps",
        "99999999",
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(e.contains("--steps"), "{e}");
    // A VAE folder where the UNet should be.
    let model = dir.path().join("sd1");
    crate::common::copy_tree(&fixtures().join("sd1"), &model);
    std::fs::copy(
        fixtures().join("sd1/vae/config.json"),
        model.join("unet/config.json"),
    )
    .unwrap();
    let e = expect_error(&txt2img_at(
        model.to_str().unwrap(),
        out.to_str().unwrap(),
        &["--steps", "2"],
    ));
    assert!(
        e.contains("unet/config.json")
            && e.contains("AutoencoderKL")
            && e.contains("UNet2DConditionModel"),
        "{e}"
    );
    // A sharded index whose shard leaves the model folder.
    let sd2 = dir.path().join("sd2");
    crate::common::copy_tree(&fixtures().join("sd2"), &sd2);
    let idx = sd2.join("unet/diffusion_pytorch_model.safetensors.index.json");
    let text = std::fs::read_to_string(&idx).unwrap();
    let first = text
        .split("\"weight_map\"")
        .nth(1)
        .unwrap()
        .split('"')
        .nth(3)
        .unwrap()
        .to_string();
    std::fs::write(&idx, text.replace(&first, "../../../etc/passwd")).unwrap();
    let e = expect_error(&txt2img_at(
        sd2.to_str().unwrap(),
        out.to_str().unwrap(),
        &["--steps", "2"],
    ));
    assert!(
        e.contains("../../../etc/passwd") && e.contains("inside the model folder"),
        "{e}"
    );
    assert!(!out.exists());
}

/// A safetensors file from a header and a data section.
fn safetensors(header: &str, data: usize) -> Vec<u8> {
    let mut h = header.as_bytes().to_vec();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut f = (h.len() as u64).to_le_bytes().to_vec();
    f.extend(h);
    f.extend(vec![0u8; data]);
    f
}

#[test]
fn malformed_safetensors_headers_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    for (name, header, data, want) in [
        (
            "dup",
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
            8,
            "appears twice",
        ),
        (
            "overlap",
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
            8,
            "overlaps",
        ),
        (
            "gap",
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
            8,
            "gap",
        ),
        (
            "overflow",
            r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,4]}}"#,
            4,
            "overflows",
        ),
        (
            "trailing",
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            12,
            "after the last tensor",
        ),
    ] {
        let p = dir.path().join(format!("{name}.safetensors"));
        std::fs::write(&p, safetensors(header, data)).unwrap();
        let e = format!(
            "{:#}",
            toffee::weights::safetensors::read_all(&p)
                .err()
                .unwrap_or_else(|| panic!("{name}: accepted"))
        );
        assert!(
            e.contains(&format!("{name}.safetensors")) && e.contains(want),
            "{name}: {e}"
        );
    }
}

#[test]
fn seeds_do_not_wrap_and_stale_temporaries_are_cleaned() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.png");
    let e = expect_error(&toffee(&[
        "txt2img",
        "--prompt",
        "x",
        "-n",
        "2",
        "--seed",
        "18446744073709551615",
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(e.contains("--seed") && e.contains("overflows"), "{e}");
    // A temporary file an interrupted run left beside the output is removed (and said).
    let stale = dir.path().join(".o.png.tmp.12345-0");
    std::fs::write(&stale, b"half").unwrap();
    let unrelated = dir.path().join(".other.png.tmp.1-0");
    std::fs::write(&unrelated, b"x").unwrap();
    let o = txt2img(&out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("removed 1 temporary file"),
        "{}",
        stderr(&o)
    );
    assert!(!stale.exists() && unrelated.exists());
}

/// A JPEG whose frame header claims 65500×65500 (a few KB on disk, 12 GB decoded).
fn jpeg_bomb() -> Vec<u8> {
    let mut b = std::fs::read(fixtures().join("images/photo.jpg")).unwrap();
    let sof = (0..b.len() - 1)
        .find(|&i| b[i] == 0xFF && matches!(b[i + 1], 0xC0..=0xC2))
        .expect("a SOF marker");
    // FF Cx, length (2), precision (1), height (2), width (2)
    b[sof + 5..sof + 7].copy_from_slice(&65500u16.to_be_bytes());
    b[sof + 7..sof + 9].copy_from_slice(&65500u16.to_be_bytes());
    b
}

/// Decompression bombs and absurd sizes under `ulimit -v 8G`: clean errors (exit 1, the message
/// naming the file or flag) with the process never above 4 GB of RSS.
#[test]
fn memory_bounded_runs_of_bombs_and_huge_sizes() {
    let d = tempfile::tempdir().unwrap();
    let bomb = d.path().join("bomb.jpg");
    std::fs::write(&bomb, jpeg_bomb()).unwrap();
    let out = d.path().join("o.png");
    let (o, b) = (out.to_str().unwrap(), bomb.to_str().unwrap());
    let dino = fixtures().join("vision/dinov2");
    let dino = dino.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["img2img", "--prompt", "x", "--image", b, "--out", o],
            "TOFFEE_MAX_IMAGE_PIXELS",
        ),
        (
            vec![
                "inpaint", "--prompt", "x", "--image", b, "--mask", b, "--out", o,
            ],
            "TOFFEE_MAX_IMAGE_PIXELS",
        ),
        (
            vec![
                "txt2img", "--prompt", "x", "--width", "1048576", "--height", "1048576", "--out", o,
            ],
            "--width",
        ),
        (
            vec!["txt2img", "--prompt", "x", "-n", "4294967295", "--out", o],
            "--images-per-prompt",
        ),
        (
            vec![
                "txt2img",
                "--prompt",
                "x",
                "--steps",
                "4000000000",
                "--out",
                o,
            ],
            "--steps",
        ),
        (
            vec!["embed", "--model", dino, "--images", b, "--out", o],
            "TOFFEE_MAX_IMAGE_PIXELS",
        ),
    ];
    for (args, needle) in cases {
        let (code, err, rss) = crate::common::toffee_bounded(&args, &[]);
        assert_eq!(code, Some(1), "{args:?}: not a clean failure: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(
            err.contains(needle),
            "{args:?}: the error does not name {needle}: {err}"
        );
        assert!(rss < 4 << 30, "{args:?}: peak RSS {} MB", rss >> 20);
        assert!(!out.exists(), "{args:?}: wrote an output");
    }
}

/// `--out dir/` writes numbered images into the folder (created if missing); a folder that
/// cannot be written is refused before any model loads; NaN/empty `forward` inputs are named.
#[test]
fn output_folders_and_forward_inputs() {
    let d = tempfile::tempdir().unwrap();
    let dir = format!("{}/imgs/", d.path().display());
    let o = txt2img(std::path::Path::new(&dir), &["-n", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(d.path().join("imgs/0000.png").is_file() && d.path().join("imgs/0001.png").is_file());
    // read-only folder: refused up front (root ignores permissions, so only check as a user)
    if unsafe { libc::geteuid() } != 0 {
        use std::os::unix::fs::PermissionsExt;
        let ro = d.path().join("ro");
        std::fs::create_dir(&ro).unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        let e = expect_error(&txt2img(&ro.join("x.png"), &[]));
        assert!(e.contains("no permission"), "{e}");
    }
    // a NaN in a forward input
    let inp = d.path().join("in.safetensors");
    let mut ids = toffee::tensor::Tensor::new(vec![1, 77], vec![1.0; 77]);
    ids.data_mut()[5] = f32::NAN;
    toffee::weights::safetensors::write_f32(&inp, &[("input_ids".into(), ids)]).unwrap();
    let o = crate::common::forward_at(
        &fixtures().join("sd1"),
        "text-encoder",
        &inp,
        &d.path().join("out.safetensors"),
        &[],
    );
    let e = expect_error(&o);
    assert!(e.contains("input_ids") && e.contains("non-finite"), "{e}");
}

/// Init latents for more images than requested would be silently dropped: an error.
#[test]
fn init_latents_must_match_the_image_count() {
    let d = tempfile::tempdir().unwrap();
    let l = d.path().join("l.safetensors");
    let t = toffee::tensor::Tensor::new(vec![3, 4, 8, 8], vec![0.1; 3 * 4 * 64]);
    toffee::weights::safetensors::write_f32(&l, &[("latents".into(), t)]).unwrap();
    let o = txt2img(
        &d.path().join("x.png"),
        &[
            "--model",
            fixtures().join("sd1").to_str().unwrap(),
            "--init-latents",
            l.to_str().unwrap(),
        ],
    );
    let e = expect_error(&o);
    assert!(
        e.contains("3 images' noise") && e.contains("1 images are requested"),
        "{e}"
    );
}

/// `TOFFEE_MAX_IMAGE_PIXELS` set to something that is not a positive whole number is an error
/// naming it, not silently the default (issue 27).
#[test]
fn a_bad_image_pixel_limit_is_an_error() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o.png");
    let img = fixtures().join("zero123/subject.png");
    for v in ["abc", "0", "-5"] {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_toffee"))
            .args(["img2img", "--prompt", "x", "--steps", "1", "--image"])
            .arg(&img)
            .arg("--out")
            .arg(&out)
            .env("TOFFEE_MAX_IMAGE_PIXELS", v)
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{v}: {e}");
        assert!(
            e.contains("TOFFEE_MAX_IMAGE_PIXELS") && e.contains(v),
            "{v}: {e}"
        );
        assert!(!out.exists());
    }
}

/// Runs toffee with `args`, failing the test if it has not ended within a minute (a hang).
fn toffee_within_a_minute(args: &[&str]) -> std::process::Output {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_toffee"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed().as_secs() > 60 {
            let _ = child.kill();
            panic!("{args:?}: still running after a minute (waiting on a special file?)");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// A FIFO or a device where a file is expected (an image, a prompt or subject list, weights, a
/// pairs file) is an error naming what it is, not a hang or a read without end (issue 27 item 5).
#[test]
fn special_files_are_refused_not_read() {
    let d = tempfile::tempdir().unwrap();
    // Named as weights so that `inspect` opens them.
    let fifo = d.path().join("fifo.safetensors");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // Safety: a valid C string; mkfifo only creates the node.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let zero = d.path().join("zero.safetensors");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    let (f, z) = (fifo.to_str().unwrap(), zero.to_str().unwrap());
    let out = d.path().join("o.png");
    let o = out.to_str().unwrap();
    let (dino, clip) = (
        fixtures().join("vision/dinov2"),
        fixtures().join("vision/clip"),
    );
    let (dino, clip) = (dino.to_str().unwrap(), clip.to_str().unwrap());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["img2img", "--prompt", "x", "--image", f, "--out", o],
            "a FIFO",
        ),
        (
            vec!["img2img", "--prompt", "x", "--image", z, "--out", o],
            "a device",
        ),
        (vec!["txt2img", "--prompts-file", f, "--out", o], "a FIFO"),
        (vec!["inspect", f], "a FIFO"),
        (vec!["inspect", z], "a device"),
        (
            vec![
                "score", "--dino", dino, "--clip", clip, "--pairs", f, "--out", o,
            ],
            "a FIFO",
        ),
    ];
    for (args, needle) in cases {
        let r = toffee_within_a_minute(&args);
        let e = stderr(&r);
        assert_eq!(r.status.code(), Some(1), "{args:?}: {e}");
        assert!(e.contains(needle), "{args:?}: {e}");
        assert!(!out.exists(), "{args:?}: wrote an output");
    }
    // The pairs job: a subject list that is a FIFO is a setup error; a subject image that is a
    // device is a skipped subject (here the only one: the job fails).
    let pairs_out = d.path().join("pairs");
    let r = toffee_within_a_minute(&[
        "pairs",
        "--subjects",
        f,
        "--out",
        pairs_out.to_str().unwrap(),
    ]);
    assert_eq!(r.status.code(), Some(2), "{}", stderr(&r));
    assert!(stderr(&r).contains("a FIFO"), "{}", stderr(&r));
    let subjects = d.path().join("subjects");
    std::fs::create_dir(&subjects).unwrap();
    std::os::unix::fs::symlink("/dev/urandom", subjects.join("noise.png")).unwrap();
    let r = toffee_within_a_minute(&[
        "pairs",
        "--subjects",
        subjects.to_str().unwrap(),
        "--out",
        pairs_out.to_str().unwrap(),
    ]);
    let e = stderr(&r);
    assert_eq!(r.status.code(), Some(1), "{e}");
    assert!(
        e.contains("a device") && e.contains("no usable subject"),
        "{e}"
    );
}

/// A `forward` input the component does not read (a misspelt name would run the model without
/// it) is an error naming it and listing the accepted names (issue 27).
#[test]
fn forward_inputs_the_component_does_not_take_are_errors() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o.safetensors");
    let sd1 = fixtures().join("sd1");
    let ids = || filled(vec![1, 77], 1.0);
    let inp = forward_inputs(
        d.path(),
        "extra.safetensors",
        vec![("input_ids", ids()), ("attention_mask", ids())],
    );
    let e = expect_error(&crate::common::forward_at(
        &sd1,
        "text-encoder",
        &inp,
        &out,
        &[],
    ));
    assert!(
        e.contains("extra.safetensors")
            && e.contains("`attention_mask`")
            && e.contains("text-encoder")
            && e.contains("it takes: input_ids"),
        "{e}"
    );
    // ControlNet residuals past a gap would be ignored.
    let unet = vec![
        ("sample", filled(vec![1, 4, 8, 8], 0.1)),
        ("timestep", filled(vec![1], 10.0)),
        ("encoder_hidden_states", filled(vec![1, 77, 16], 0.1)),
        ("down_res.1", filled(vec![1, 4, 8, 8], 0.1)),
        ("mid_res", filled(vec![1, 4, 8, 8], 0.1)),
    ];
    let inp = forward_inputs(d.path(), "gap.safetensors", unet);
    let e = expect_error(&crate::common::forward_at(&sd1, "unet", &inp, &out, &[]));
    assert!(
        e.contains("`down_res.1`") && e.contains("down_res.0 is missing"),
        "{e}"
    );
    assert!(!out.exists());
}

/// `forward` inputs larger than any model run can take (latent sides past 16384/8, batches past
/// 4096, image-encoder patch counts past the token limit) are clean errors before anything is
/// allocated, under `ulimit -v 8G` and below 4 GB of RSS (issue 27, item 5).
#[test]
fn huge_forward_inputs_are_refused_before_allocating() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o.safetensors");
    let sd1 = fixtures().join("sd1");
    let dino = fixtures().join("vision/dinov2");
    let cases = [
        (
            &sd1,
            "vae-decode",
            vec![("latent", filled(vec![1, 4, 4096, 8], 0.1))],
            "`latent`",
        ),
        (
            &sd1,
            "unet",
            vec![
                ("sample", filled(vec![1, 4, 8, 3000], 0.1)),
                ("timestep", filled(vec![1], 10.0)),
                ("encoder_hidden_states", filled(vec![1, 77, 16], 0.1)),
            ],
            "`sample`",
        ),
        (
            &sd1,
            "text-encoder",
            vec![("input_ids", filled(vec![5000, 77], 1.0))],
            "`input_ids`",
        ),
        (
            &dino,
            "image-encoder",
            vec![
                ("pixel_values", filled(vec![1, 3, 1024, 1024], 0.1)),
                ("interpolate_pos_encoding", filled(vec![1], 1.0)),
            ],
            "patches",
        ),
    ];
    for (i, (model, component, tensors, needle)) in cases.into_iter().enumerate() {
        let inp = forward_inputs(d.path(), &format!("in{i}.safetensors"), tensors);
        let args = crate::common::forward_args(model, component, &inp, &out);
        let (code, err, rss) = crate::common::toffee_bounded(&args, &[]);
        assert_eq!(code, Some(1), "{component}: not a clean failure: {err}");
        assert!(
            err.contains(needle) && err.contains(inp.to_str().unwrap()) && err.contains("allowed"),
            "{component}: {err}"
        );
        assert!(rss < 4 << 30, "{component}: peak RSS {} MB", rss >> 20);
        assert!(!out.exists(), "{component}: wrote an output");
    }
}

/// A NaN in an --init-latents file is named with the file and flag up front, not reported after
/// the run as the model producing NaN (issue 27, item 8).
#[test]
fn non_finite_init_latents_name_the_file() {
    let d = tempfile::tempdir().unwrap();
    let mut t = filled(vec![1, 4, 8, 8], 0.1);
    t.data_mut()[3] = f32::NAN;
    let l = forward_inputs(d.path(), "nan-latents.safetensors", vec![("latents", t)]);
    let out = d.path().join("x.png");
    let e = expect_error(&txt2img(
        &out,
        &[
            "--model",
            fixtures().join("sd1").to_str().unwrap(),
            "--init-latents",
            l.to_str().unwrap(),
        ],
    ));
    assert!(
        e.contains("nan-latents.safetensors")
            && e.contains("--init-latents")
            && e.contains("non-finite"),
        "{e}"
    );
    assert!(!out.exists());
}
