//! txt2img / img2img / inpaint through the binary, per-image seeds, and bad arguments.

use crate::common::*;
use std::path::Path;
use toffee::pipeline::{Generator, Init, Request};
use toffee::weights::safetensors::{read_all, write_f32};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn png_size(p: &Path) -> (u32, u32) {
    let img = toffee::image_io::load(p).unwrap();
    let (_, h, w, _) = img.rgb.dims4();
    (w as u32, h as u32)
}

#[test]
fn builtin_model_main_job_writes_a_png() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let o = toffee(&[
        "txt2img",
        "--prompt",
        "a photo of a cat",
        "--steps",
        "4",
        "--out",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("images/s"), "{}", stderr(&o));
    assert_eq!(png_size(&out), (256, 256));
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "no temporary files left: {names:?}");
}

#[test]
fn txt2img_cli_matches_diffusers_with_init_latents() {
    // sd1_txt2img_euler: one prompt, no negative, 2 images of 96×64, Euler, 4 steps.
    let dir = tempfile::tempdir().unwrap();
    let g = read_all(&golden("pipelines/sd1_txt2img_euler.safetensors")).unwrap();
    let init = dir.path().join("init.safetensors");
    write_f32(&init, &[("latents".into(), g["noise.0"].clone())]).unwrap();
    let case: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(golden("pipelines/sd1_txt2img_euler.json")).unwrap(),
    )
    .unwrap();
    let saved = dir.path().join("latents.safetensors");
    let out = dir.path().join("img.png");
    let o = toffee(&[
        "txt2img",
        "--model",
        s(&fixtures().join("sd1")),
        "--prompt",
        case["prompts"][0].as_str().unwrap(),
        "-n",
        "2",
        "--batch",
        "2",
        "--steps",
        "4",
        "--scheduler",
        "euler",
        "--width",
        "96",
        "--height",
        "64",
        "--init-latents",
        s(&init),
        "--save-latents",
        s(&saved),
        "--out",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got = read_all(&saved).unwrap();
    let err = got["latents"].max_abs_diff(&g["latents"]);
    assert!(err <= 1e-3, "latents differ from diffusers by {err:e}");
    for i in 0..2 {
        assert_eq!(
            png_size(&dir.path().join(format!("img-000{i}.png"))),
            (96, 64)
        );
    }
}

fn sd1() -> Generator {
    Generator::load(&fixtures().join("sd1"), None, &toffee::backend::Device::Cpu).unwrap()
}

fn request(batch: usize, seed: u64) -> Request {
    Request {
        prompts: vec!["a cat".into(), "a dog on a beach".into()],
        negative: None,
        images_per_prompt: 2,
        steps: 3,
        guidance: 7.5,
        width: 64,
        height: 64,
        scheduler: Some("euler-a".parse().unwrap()),
        seed,
        batch,
        init: Init::Noise,
        control: None,
        init_latents: None,
        image_prompts: Vec::new(),
    }
}

#[test]
fn per_image_seeds_do_not_depend_on_the_batch() {
    let g = sd1();
    let one = g.run(&request(1, 11), &mut |_, _| {}).unwrap();
    let all = g.run(&request(4, 11), &mut |_, _| {}).unwrap();
    let three = g.run(&request(3, 11), &mut |_, _| {}).unwrap();
    assert_eq!(one.latents.shape(), [4, 8, 8, 4]);
    for other in [&all, &three] {
        let err = one.latents.max_abs_diff(&other.latents);
        assert!(err < 1e-4, "batch size changed the result by {err:e}");
    }
    // Image 2 of seed 11 is image 0 of seed 13 (seed + index), given the same prompt.
    let mut shifted = request(2, 13);
    shifted.prompts = vec!["a dog on a beach".into()];
    let s = g.run(&shifted, &mut |_, _| {}).unwrap();
    assert!(
        s.latents
            .narrow0(0, 2)
            .max_abs_diff(&one.latents.narrow0(2, 2))
            < 1e-4
    );
    // Different seeds give different images; the images in one run differ from each other.
    let other_seed = g.run(&request(4, 12), &mut |_, _| {}).unwrap();
    assert!(other_seed.latents.max_abs_diff(&all.latents) > 0.1);
    assert!(
        all.latents
            .narrow0(0, 1)
            .max_abs_diff(&all.latents.narrow0(1, 1))
            > 0.1
    );
}

#[test]
fn img2img_and_inpaint_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let g = read_all(&golden("pipelines/sd1_inpaint_4ch.safetensors")).unwrap();
    let image = dir.path().join("image.png");
    toffee::image_io::save_png(&image, &g["init_image"].to_nhwc()).unwrap();
    let mask_t = g["mask_image"].to_nhwc();
    let mask3 = toffee::backend::concat_channels(&[&mask_t, &mask_t, &mask_t]);
    let mask = dir.path().join("mask.png");
    toffee::image_io::save_png(&mask, &mask3).unwrap();
    let model = fixtures().join("sd1");
    let run = |cmd: &str, extra: &[&str], out: &Path| {
        let mut args = vec![
            cmd,
            "--model",
            s(&model),
            "--prompt",
            "a cat",
            "--steps",
            "3",
            "--image",
            s(&image),
            "--out",
            s(out),
        ];
        args.extend_from_slice(extra);
        toffee(&args)
    };
    let a = dir.path().join("a.png");
    let o = run("img2img", &["--strength", "0.6", "--seed", "5"], &a);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(png_size(&a), (64, 64));
    let b = dir.path().join("b.png");
    let o = run("img2img", &["--strength", "0.6", "--seed", "5"], &b);
    assert!(o.status.success());
    assert_eq!(
        std::fs::read(&a).unwrap(),
        std::fs::read(&b).unwrap(),
        "same seed, same PNG"
    );
    let c = dir.path().join("c.png");
    let o = run(
        "inpaint",
        &[
            "--mask",
            s(&mask),
            "--save-latents",
            s(&dir.path().join("l.safetensors")),
        ],
        &c,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(png_size(&c), (64, 64));
    let e = expect_error(&run("inpaint", &[], &dir.path().join("d.png")));
    assert!(e.contains("--mask"), "{e}");
}

#[test]
fn controlnet_with_canny_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let g = read_all(&golden("pipelines/sd1_controlnet_ddim.safetensors")).unwrap();
    let control = dir.path().join("control.png");
    toffee::image_io::save_png(&control, &g["control_image"].to_nhwc()).unwrap();
    let out = dir.path().join("o.png");
    let o = toffee(&[
        "txt2img",
        "--model",
        s(&fixtures().join("sd1")),
        "--controlnet",
        s(&fixtures().join("controlnet-sd1")),
        "--control-image",
        s(&control),
        "--canny",
        "--control-scale",
        "0.5",
        "--prompt",
        "a house",
        "--steps",
        "2",
        "--scheduler",
        "dpmpp-2m-karras",
        "--out",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(png_size(&out), (64, 64));
}

#[test]
fn sdxl_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let o = toffee(&[
        "txt2img",
        "--model",
        s(&fixtures().join("sdxl")),
        "--prompt",
        "a cat",
        "--negative",
        "ugly",
        "--steps",
        "2",
        "--out",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(png_size(&out), (64, 64));
}

#[test]
fn bad_arguments_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.png");
    let model = fixtures().join("sd1");
    let e = expect_error(&toffee(&[
        "txt2img",
        "--model",
        "/no/such/model",
        "--prompt",
        "x",
        "--out",
        s(&out),
    ]));
    assert!(e.contains("/no/such/model"), "{e}");
    let e = expect_error(&toffee(&[
        "txt2img",
        "--prompt",
        "x",
        "--steps",
        "2",
        "--out",
        s(&dir.path().join("nodir/o.png")),
    ]));
    assert!(e.contains("nodir") && e.contains("does not exist"), "{e}");
    let e = expect_error(&toffee(&["txt2img", "--out", s(&out)]));
    assert!(e.contains("no prompt"), "{e}");
    let e = expect_error(&toffee(&[
        "txt2img",
        "--prompt",
        "x",
        "--width",
        "100",
        "--out",
        s(&out),
    ]));
    assert!(e.contains("--width 100"), "{e}");
    let e = expect_error(&toffee(&[
        "txt2img",
        "--prompt",
        "x",
        "--strength",
        "0.5",
        "--out",
        s(&out),
    ]));
    assert!(e.contains("--strength"), "{e}");
    let corrupt = dir.path().join("corrupt.png");
    std::fs::write(&corrupt, b"\x89PNG\r\n\x1a\nthis is not a png").unwrap();
    let e = expect_error(&toffee(&[
        "img2img",
        "--model",
        s(&model),
        "--prompt",
        "x",
        "--image",
        s(&corrupt),
        "--out",
        s(&out),
    ]));
    assert!(e.contains("corrupt.png"), "{e}");
    let e = expect_error(&toffee(&[
        "img2img",
        "--model",
        s(&model),
        "--prompt",
        "x",
        "--out",
        s(&out),
    ]));
    assert!(e.contains("--image"), "{e}");
    let e = expect_error(&toffee(&[
        "txt2img",
        "--model",
        s(&model),
        "--prompt",
        "x",
        "--control-image",
        s(&corrupt),
        "--out",
        s(&out),
    ]));
    assert!(e.contains("--controlnet"), "{e}");
    let e = expect_error(&toffee(&[
        "txt2img",
        "--prompts-file",
        "/no/prompts.txt",
        "--out",
        s(&out),
    ]));
    assert!(e.contains("/no/prompts.txt"), "{e}");
    let o = toffee(&[
        "txt2img",
        "--prompt",
        "x",
        "--scheduler",
        "lms",
        "--out",
        s(&out),
    ]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "clap rejects an unknown scheduler"
    );
    assert!(stderr(&o).contains("lms"), "{}", stderr(&o));
    assert!(!out.exists(), "no output after failures");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "only the corrupt input is there"
    );
}

#[test]
fn prompts_file_and_batches() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.txt");
    std::fs::write(&prompts, "a cat\n\na dog\n").unwrap();
    let out = dir.path().join("img.png");
    let o = toffee(&[
        "txt2img",
        "--prompts-file",
        s(&prompts),
        "-n",
        "2",
        "--batch",
        "3",
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--out",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    for i in 0..4 {
        assert!(dir.path().join(format!("img-000{i}.png")).exists());
    }
}

/// A UNet config claiming an absurd `sample_size` (the default side of every image without a
/// size) is an error naming the file, from txt2img and view as from the C ABI, not an abort when
/// the image is allocated (issue 27).
#[test]
fn a_model_claiming_a_huge_default_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.png");
    let img = fixtures().join("zero123/subject.png");
    for (fixture, size, want) in [
        (
            "sd1",
            1u64 << 40,
            "sample_size 1099511627776 is not 1 to 16384",
        ),
        (
            "sd1",
            4096,
            "sample_size × the VAE's factor is 4096 × 8 pixels, over 16384",
        ),
        (
            "zero123",
            1 << 40,
            "sample_size 1099511627776 is not 1 to 16384",
        ),
    ] {
        let copy = dir.path().join(format!("{fixture}-{size}"));
        copy_tree(&fixtures().join(fixture), &copy);
        let config = copy.join("unet/config.json");
        let mut c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
        c["sample_size"] = size.into();
        std::fs::write(&config, c.to_string()).unwrap();
        let args: Vec<&str> = match fixture {
            "sd1" => vec![
                "txt2img",
                "--model",
                s(&copy),
                "--prompt",
                "x",
                "--out",
                s(&out),
            ],
            _ => vec![
                "view",
                "--model",
                s(&copy),
                "--image",
                s(&img),
                "--elevation",
                "0",
                "--azimuth",
                "0",
                "--out",
                s(&out),
            ],
        };
        let e = expect_error(&toffee(&args));
        assert!(
            e.contains(want) && e.contains("unet/config.json"),
            "{fixture} {size}: {e}"
        );
        assert!(!out.exists());
    }
}
