//! LoRAs fused at load time against diffusers 0.42.1's `load_lora_weights` + `fuse_lora`
//! (tools/fixtures/lora.py): the fused weights of every layout (PEFT with α in the metadata,
//! kohya with per-module α, kohya SDXL with SGM UNet names, two encoders), scales, two LoRAs with
//! their own weights; and LoRAs that do not fit the model are errors naming what is wrong. The
//! pipelines with LoRAs are in tests/pipelines.rs (`lora_cases!`).

use crate::common::{expect_error, fixtures, toffee, txt2img_at};
use serde_json::Value;
use std::collections::BTreeSet;
use toffee::models::load::checkpoint_with_loras;
use toffee::weights::lora::{Lora, LoraSpec};
use toffee::weights::safetensors::read_all;

fn run_fused_case(name: &str) {
    let root = fixtures();
    let m: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("golden/lora/manifest.json")).unwrap(),
    )
    .unwrap();
    let case = m["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap();
    let lora_scale = case["lora_scale"].as_f64().unwrap();
    let loras: Vec<Lora> = case["loras"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            Lora::open(&LoraSpec {
                path: root.join(l["file"].as_str().unwrap()),
                scale: (lora_scale * l["adapter_weight"].as_f64().unwrap_or(1.0)) as f32,
            })
            .unwrap()
        })
        .collect();
    let want = read_all(
        &root
            .join("golden/lora")
            .join(case["tensors"].as_str().unwrap()),
    )
    .unwrap();
    let model = root.join(case["model"].as_str().unwrap());
    let mut compared = 0;
    for comp in ["unet", "text_encoder", "text_encoder_2"] {
        let prefix = format!("{comp}.");
        let wanted: Vec<(&String, _)> = want
            .iter()
            .filter(|(k, _)| {
                k.starts_with(&prefix)
                    && !(comp == "text_encoder" && k.starts_with("text_encoder_2."))
            })
            .collect();
        if !model.join(comp).is_dir() {
            assert!(wanted.is_empty());
            continue;
        }
        let ck = checkpoint_with_loras(&model, comp, &loras)
            .unwrap_or_else(|e| panic!("{name} {comp}: {e:#}"));
        let norm = |k: &str| -> String {
            let k = &k[prefix.len()..];
            k.strip_prefix("text_model.").unwrap_or(k).to_string()
        };
        let want_names: BTreeSet<String> = wanted.iter().map(|(k, _)| norm(k)).collect();
        let got_names: BTreeSet<String> = ck.weights.adapted().map(String::from).collect();
        assert_eq!(
            got_names, want_names,
            "{name} {comp}: the set of changed weights"
        );
        for (k, w) in wanted {
            let g = ck.weights.get_any(&norm(k)).unwrap();
            assert_eq!(g.shape(), w.shape(), "{name} {k}");
            let err = g.max_abs_diff(w);
            assert!(err <= 1e-4, "{name} {k}: fused weight differs by {err:e}");
            compared += 1;
        }
    }
    assert!(compared > 10, "{name}: only {compared} weights compared");
}

macro_rules! fused {
    ($($name:ident),* $(,)?) => { $( #[test] fn $name() { run_fused_case(stringify!($name)); } )* };
}

fused!(
    fused_sd1_peft,
    fused_sd1_kohya,
    fused_sdxl_kohya,
    fused_sdxl_peft,
    fused_sd1_unet_only_b,
    fused_sd1_kohya_s07,
    fused_sd1_peft_plus_b,
);

#[test]
fn lora_specs_parse_weights() {
    let s: LoraSpec = "a/b.safetensors:0.8".parse().unwrap();
    assert_eq!(
        (s.path.to_str().unwrap(), s.scale),
        ("a/b.safetensors", 0.8)
    );
    let s: LoraSpec = "c:/x.safetensors".parse().unwrap();
    assert_eq!(
        (s.path.to_str().unwrap(), s.scale),
        ("c:/x.safetensors", 1.0)
    );
    assert!("a.safetensors:inf".parse::<LoraSpec>().is_err());
}

#[test]
fn loras_for_another_model_are_errors() {
    let f = fixtures();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("x.png");
    let run = |lora: &str| {
        txt2img_at(
            f.join("sd1").to_str().unwrap(),
            out.to_str().unwrap(),
            &["--steps", "1", "--lora", lora],
        )
    };
    let e = expect_error(&run(f
        .join("lora/bad-wrong-model.safetensors")
        .to_str()
        .unwrap()));
    assert!(
        e.contains("bad-wrong-model.safetensors") && e.contains("another model"),
        "{e}"
    );
    let e = expect_error(&run(f
        .join("lora/bad-unknown-key.safetensors")
        .to_str()
        .unwrap()));
    assert!(
        e.contains("bad-unknown-key.safetensors") && e.contains("match no weight"),
        "{e}"
    );
    // a pipeline file given as a LoRA
    let e = expect_error(&run(f
        .join("sd1/unet/diffusion_pytorch_model.safetensors")
        .to_str()
        .unwrap()));
    assert!(e.contains("not LoRA factors"), "{e}");
    assert!(!out.exists());
    // the CLI applies a good one (and two) without error, and they change the result (the
    // tiny model's decoded images saturate, so compare latents)
    let latents = |extra: &[&str]| -> toffee::tensor::Tensor {
        let l = d.path().join("l.safetensors");
        let model = f.join("sd1");
        let mut a = vec![
            "txt2img",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "x",
            "--steps",
            "1",
            "--out",
            out.to_str().unwrap(),
            "--save-latents",
            l.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        let o = toffee(&a);
        assert!(o.status.success(), "{}", crate::common::stderr(&o));
        read_all(&l).unwrap().remove("latents").unwrap()
    };
    let plain = latents(&[]);
    let peft = format!("{}:0.8", f.join("lora/sd1-peft.safetensors").display());
    let b = format!(
        "{}:0.5",
        f.join("lora/sd1-unet-only-b.safetensors").display()
    );
    let one = latents(&["--lora", &peft]);
    let two = latents(&["--lora", &peft, "--lora", &b]);
    assert!(plain.max_abs_diff(&one) > 1e-3 && one.max_abs_diff(&two) > 1e-4);
}

/// A LoRA path that is not there is named as a path (not a "cannot open" of the reader), with or
/// without a weight; a folder and an empty path are named too (issue 27).
#[test]
fn missing_lora_files_are_named_as_paths() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("x.png");
    let model = fixtures().join("sd1");
    let run = |lora: &str| {
        expect_error(&txt2img_at(
            model.to_str().unwrap(),
            out.to_str().unwrap(),
            &["--steps", "1", "--lora", lora],
        ))
    };
    for lora in ["/no/such.safetensors", "/no/such.safetensors:0.5"] {
        let e = run(lora);
        assert!(
            e.contains("/no/such.safetensors: no such file"),
            "{lora}: {e}"
        );
    }
    let e = run(d.path().to_str().unwrap());
    assert!(e.contains("a folder, not a LoRA"), "{e}");
    assert!(!out.exists());
    for empty in ["", ":0.5"] {
        let e = empty.parse::<LoraSpec>().unwrap_err().to_string();
        assert!(e.contains("--lora"), "{empty:?}: {e}");
    }
}
