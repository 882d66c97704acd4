//! `toffee forward` and `toffee inspect` through the binary.

use crate::common::*;
use toffee::weights::safetensors::{read_all, write_f32};

fn forward(
    model: &str,
    component: &str,
    inputs: &std::path::Path,
    out: &std::path::Path,
) -> std::process::Output {
    forward_at(&fixtures().join(model), component, inputs, out, &[])
}

fn assert_close(out: &std::path::Path, golden_out: &str) {
    let got = read_all(out).unwrap();
    let want = read_all(&golden(golden_out)).unwrap();
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (k, w) in &want {
        let err = got[k].max_abs_diff(w);
        assert!(err <= 1e-4, "{k}: max abs error {err:e}");
    }
}

#[test]
fn forward_unet_matches_golden() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let o = forward("sd1", "unet", &golden("sd1_unet.in.safetensors"), &out);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_close(&out, "sd1_unet.out.safetensors");
}

#[test]
fn forward_sdxl_unet_with_controlnet_residuals() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let o = forward(
        "sdxl",
        "unet",
        &golden("sdxl_unet_controlres.in.safetensors"),
        &out,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_close(&out, "sdxl_unet_controlres.out.safetensors");
}

#[test]
fn forward_other_components_match_goldens() {
    let dir = tempfile::tempdir().unwrap();
    for (model, comp, case) in [
        ("controlnet-sd1", "controlnet", "sd1_controlnet"),
        ("sd1", "vae-encode", "sd1_vae_encode_nonsquare"),
        ("sd1", "vae-decode", "sd1_vae_decode"),
        ("sd2", "text-encoder", "sd2_text_encoder"),
        ("sdxl", "text-encoder-2", "sdxl_text_encoder_2"),
    ] {
        let out = dir.path().join(format!("{case}.safetensors"));
        let o = forward(
            model,
            comp,
            &golden(&format!("{case}.in.safetensors")),
            &out,
        );
        assert!(o.status.success(), "{case}: {}", stderr(&o));
        assert_close(&out, &format!("{case}.out.safetensors"));
    }
}

/// An input the component does not read is an error naming it and the accepted inputs (it used
/// to be ignored, so a misspelt name ran the model without it: issue 27); missing ones are named.
#[test]
fn forward_refuses_extra_inputs_and_names_missing_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mut inputs: Vec<(String, toffee::tensor::Tensor)> =
        read_all(&golden("sd1_vae_decode.in.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    inputs.push(("unrelated".into(), toffee::tensor::Tensor::scalar(3.0)));
    let extra = dir.path().join("extra.safetensors");
    write_f32(&extra, &inputs).unwrap();
    let out = dir.path().join("out.safetensors");
    let e = expect_error(&forward("sd1", "vae-decode", &extra, &out));
    assert!(
        e.contains("extra.safetensors")
            && e.contains("`unrelated`")
            && e.contains("it takes: latent"),
        "{e}"
    );
    assert!(!out.exists());
    let o = forward(
        "sd1",
        "vae-decode",
        &golden("sd1_vae_decode.in.safetensors"),
        &out,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_close(&out, "sd1_vae_decode.out.safetensors");

    // The UNet needs sample, timestep and encoder_hidden_states: give it only the timestep.
    let partial = dir.path().join("partial.safetensors");
    write_f32(
        &partial,
        &[("timestep".into(), toffee::tensor::Tensor::scalar(3.0))],
    )
    .unwrap();
    let o = forward(
        "sd1",
        "unet",
        &partial,
        &dir.path().join("never.safetensors"),
    );
    let e = expect_error(&o);
    assert!(
        e.contains("missing input tensor(s): sample, encoder_hidden_states"),
        "{e}"
    );
    assert!(e.contains("partial.safetensors"), "{e}");
    assert!(!dir.path().join("never.safetensors").exists());
}

#[test]
fn forward_sdxl_unet_without_time_ids_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let inputs: Vec<(String, toffee::tensor::Tensor)> =
        read_all(&golden("sdxl_unet.in.safetensors"))
            .unwrap()
            .into_iter()
            .filter(|(k, _)| k != "time_ids" && k != "text_embeds")
            .collect();
    let p = dir.path().join("in.safetensors");
    write_f32(&p, &inputs).unwrap();
    let e = expect_error(&forward(
        "sdxl",
        "unet",
        &p,
        &dir.path().join("o.safetensors"),
    ));
    assert!(e.contains("text_embeds and time_ids"), "{e}");
}

#[test]
fn forward_refuses_cuda_in_a_cpu_build() {
    let dir = tempfile::tempdir().unwrap();
    let o = forward_at(
        &fixtures().join("sd1"),
        "vae-decode",
        &golden("sd1_vae_decode.in.safetensors"),
        &dir.path().join("o.safetensors"),
        &["--device", "cuda:0"],
    );
    let e = expect_error(&o);
    assert!(e.contains("cuda:0"), "{e}");
}

#[test]
fn inspect_names_family_variant_and_counts() {
    for (model, variant, vae_storage) in [
        (
            "sd1",
            "SD1.x-style",
            "runs in the pipeline's fp16/bf16 on GPUs",
        ),
        (
            "sd2",
            "SD2.x-style (linear projection)",
            "runs in the pipeline's fp16/bf16 on GPUs",
        ),
        (
            "sdxl",
            "SDXL-style (text_time added embeddings)",
            "runs in bf16 on GPUs (force_upcast: fp16 would overflow)",
        ),
    ] {
        let o = toffee(&["inspect", fixtures().join(model).to_str().unwrap()]);
        let s = stdout(&o);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(s.contains("diffusers pipeline"), "{s}");
        assert!(
            s.contains(&format!("unet: UNet2DConditionModel — {variant}")),
            "{model}: {s}"
        );
        assert!(s.contains("vae: AutoencoderKL"), "{s}");
        assert!(s.contains(vae_storage), "{model}: {s}");
        assert!(s.contains("text_encoder: CLIPTextModel"), "{s}");
        assert!(s.contains("config: {"), "{s}");
    }
    let s = stdout(&toffee(&[
        "inspect",
        fixtures().join("sdxl").to_str().unwrap(),
    ]));
    assert!(
        s.contains("text_encoder_2: CLIPTextModel — with projection"),
        "{s}"
    );
    assert!(s.contains(" × bf16"), "{s}");
    let s = stdout(&toffee(&[
        "inspect",
        fixtures().join("unet-inpaint").to_str().unwrap(),
    ]));
    assert!(s.contains("inpainting (9 input channels)"), "{s}");
    let s = stdout(&toffee(&[
        "inspect",
        "--load",
        fixtures().join("controlnet-sdxl").to_str().unwrap(),
    ]));
    assert!(
        s.contains("ControlNetModel — SDXL-style") && s.contains("loaded: ok"),
        "{s}"
    );
}

#[test]
fn inspect_counts_parameters_exactly() {
    // Independent count: sum the element counts in the safetensors headers.
    let file = fixtures().join("sd1/unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let count: u64 = header
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(_, v)| {
            v["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .product::<u64>()
        })
        .sum();
    let s = stdout(&toffee(&[
        "inspect",
        fixtures().join("sd1/unet").to_str().unwrap(),
    ]));
    assert!(
        s.contains(&format!(
            "{} parameters",
            toffee::inspect::grouped(count as usize)
        )),
        "{count}: {s}"
    );
    let s = stdout(&toffee(&["inspect", file.to_str().unwrap()]));
    assert!(
        s.contains("UNet2DConditionModel weights") && s.contains("× f16"),
        "{s}"
    );
}

#[test]
fn inspect_errors_name_the_path() {
    let e = expect_error(&toffee(&["inspect", "/no/such/model"]));
    assert!(
        e.contains("/no/such/model") && e.contains("no such file or directory"),
        "{e}"
    );
    let dir = tempfile::tempdir().unwrap();
    let e = expect_error(&toffee(&["inspect", dir.path().to_str().unwrap()]));
    assert!(e.contains("cannot recognise"), "{e}");
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"_class_name": "FluxTransformer2DModel"}"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("model.safetensors"),
        b"\x02\0\0\0\0\0\0\0{}",
    )
    .unwrap();
    let e = expect_error(&toffee(&["inspect", dir.path().to_str().unwrap()]));
    assert!(
        e.contains("_class_name") && e.contains("FluxTransformer2DModel"),
        "{e}"
    );
}

#[test]
fn devices_reports_and_exits_zero() {
    let o = toffee(&["devices"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = stdout(&o);
    assert!(s.contains("embedded kernel targets:"), "{s}");
    // Either devices are listed or the reason there are none is given.
    assert!(
        s.contains("cuda:0:") || s.contains("no CUDA devices:"),
        "{s}"
    );
}

#[test]
fn bench_runs_on_the_cpu_with_json() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("sd1");
    let o = toffee(&[
        "bench",
        "--config",
        model.to_str().unwrap(),
        "--component",
        "vae-decode",
        "--batch",
        "2",
        "--resolution",
        "64",
        "--iters",
        "2",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    for k in [
        "component",
        "config",
        "batch",
        "resolution",
        "ms_per_call",
        "calls_per_s",
        "device",
    ] {
        assert!(v.get(k).is_some(), "missing {k}: {v}");
    }
    assert_eq!(v["component"], "vae-decode");
    assert_eq!(v["batch"], 2);
    assert!(v["calls_per_s"].as_f64().unwrap() > 0.0);
    let e = expect_error(&toffee(&[
        "bench",
        "--config",
        dir.path().to_str().unwrap(),
        "--component",
        "unet",
    ]));
    assert!(e.contains(dir.path().to_str().unwrap()), "{e}");
}

/// A negative count, index or size is explained as such, not reported as an unknown flag
/// (issue 27 item 8).
#[test]
fn negative_numbers_for_unsigned_flags_are_explained() {
    for args in [
        &[
            "pairs",
            "--shard-index",
            "-1",
            "--num-shards",
            "2",
            "--out",
            "x",
        ][..],
        &[
            "txt2img", "--prompt", "a", "--steps", "-3", "--out", "x.png",
        ][..],
        &[
            "view",
            "--image",
            "a.png",
            "--elevation",
            "0",
            "--azimuth",
            "0",
            "--seed",
            "-1",
        ][..],
    ] {
        let o = crate::common::toffee(args);
        let e = crate::common::stderr(&o);
        assert!(!o.status.success(), "{args:?}");
        assert!(
            e.contains("must be 0 or more") && !e.contains("unexpected argument"),
            "{args:?}: {e}"
        );
    }
}
