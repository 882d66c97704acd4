//! Malformed checkpoints and inputs give errors that name the file and the thing — never a panic,
//! never a half-written output.

use crate::common::*;
use std::path::{Path, PathBuf};
use toffee::weights::safetensors::{read_all, write_f32};

/// A damaged copy of the sd1 VAE and the command that decodes with it.
struct Damaged {
    _dir: tempfile::TempDir,
    model: PathBuf,
    out: PathBuf,
}

impl Damaged {
    fn new(src: &str) -> Damaged {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        copy_tree(&fixtures().join(src), &model);
        let out = dir.path().join("out.safetensors");
        Damaged {
            _dir: dir,
            model,
            out,
        }
    }
    fn weights(&self) -> PathBuf {
        self.model.join("diffusion_pytorch_model.safetensors")
    }
    fn config(&self) -> PathBuf {
        self.model.join("config.json")
    }
    fn run(&self, component: &str, case: &str) -> String {
        let o = forward_at(
            &self.model,
            component,
            &golden(&format!("{case}.in.safetensors")),
            &self.out,
            &[],
        );
        let e = expect_error(&o);
        assert!(!self.out.exists(), "no output file after a failure");
        e
    }
    fn edit_config(&self, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(self.config()).unwrap()).unwrap();
        f(v.as_object_mut().unwrap());
        std::fs::write(self.config(), serde_json::to_string(&v).unwrap()).unwrap();
    }
    fn rewrite_weights(&self, f: impl FnOnce(&mut Vec<(String, toffee::tensor::Tensor)>)) {
        let mut t: Vec<_> = read_all(&self.weights()).unwrap().into_iter().collect();
        f(&mut t);
        write_f32(&self.weights(), &t).unwrap();
    }
}

fn vae() -> Damaged {
    Damaged::new("sd1/vae")
}

#[test]
fn truncated_safetensors() {
    let d = vae();
    let len = std::fs::metadata(d.weights()).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.weights())
        .unwrap();
    f.set_len(len / 2).unwrap();
    let e = d.run("vae-decode", "sd1_vae_decode");
    assert!(
        e.contains("diffusion_pytorch_model.safetensors") && e.contains("truncated"),
        "{e}"
    );
}

#[test]
fn garbage_and_tiny_safetensors() {
    let d = vae();
    std::fs::write(d.weights(), b"hello").unwrap();
    let e = d.run("vae-decode", "sd1_vae_decode");
    assert!(
        e.contains("diffusion_pytorch_model.safetensors") && e.contains("truncated"),
        "{e}"
    );
    let mut bytes = 40u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{ this is not json at all, not at all!! }");
    std::fs::write(d.weights(), bytes).unwrap();
    let e = d.run("vae-decode", "sd1_vae_decode");
    assert!(
        e.contains("diffusion_pytorch_model.safetensors") && e.contains("JSON"),
        "{e}"
    );
}

#[test]
fn missing_tensor() {
    let d = vae();
    d.rewrite_weights(|t| t.retain(|(k, _)| k != "decoder.conv_out.bias"));
    let e = d.run("vae-decode", "sd1_vae_decode");
    assert!(
        e.contains("missing tensor `decoder.conv_out.bias`")
            && e.contains("diffusion_pytorch_model.safetensors"),
        "{e}"
    );
}

#[test]
fn wrong_shape() {
    let d = vae();
    d.rewrite_weights(|t| {
        let (_, w) = t
            .iter_mut()
            .find(|(k, _)| k == "decoder.conv_in.weight")
            .unwrap();
        let s = w.shape().to_vec();
        *w = toffee::tensor::Tensor::zeros(vec![s[0] + 1, s[1], s[2], s[3]]);
    });
    let e = d.run("vae-decode", "sd1_vae_decode");
    assert!(
        e.contains("decoder.conv_in.weight")
            && e.contains("has shape")
            && e.contains("diffusion_pytorch_model.safetensors"),
        "{e}"
    );
}

#[test]
fn config_missing_field() {
    let d = Damaged::new("sd1/unet");
    d.edit_config(|c| {
        c.remove("block_out_channels");
    });
    let e = d.run("unet", "sd1_unet");
    assert!(
        e.contains("config.json") && e.contains("`block_out_channels` is missing"),
        "{e}"
    );
}

#[test]
fn config_unsupported_values() {
    let d = Damaged::new("sd1/unet");
    d.edit_config(|c| {
        c.insert(
            "down_block_types".into(),
            serde_json::json!(["SimpleCrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"]),
        );
    });
    let e = d.run("unet", "sd1_unet");
    assert!(
        e.contains("config.json")
            && e.contains("`down_block_types` = SimpleCrossAttnDownBlock2D is not supported"),
        "{e}"
    );

    let d = Damaged::new("sd1/unet");
    d.edit_config(|c| {
        c.insert("class_embed_type".into(), serde_json::json!("timestep"));
    });
    let e = d.run("unet", "sd1_unet");
    assert!(
        e.contains("`class_embed_type`") && e.contains("not supported"),
        "{e}"
    );

    let d = Damaged::new("sd1/text_encoder");
    d.edit_config(|c| {
        c.insert("hidden_act".into(), serde_json::json!("relu"));
    });
    let e = d.run("text-encoder", "sd1_text_encoder");
    assert!(
        e.contains("config.json") && e.contains("`hidden_act` = relu is not supported"),
        "{e}"
    );

    let d = Damaged::new("sd1/unet");
    d.edit_config(|c| {
        c.insert("layers_per_block".into(), serde_json::json!("two"));
    });
    let e = d.run("unet", "sd1_unet");
    assert!(
        e.contains("`layers_per_block` must be a non-negative integer"),
        "{e}"
    );
}

#[test]
fn config_not_json() {
    let d = vae();
    std::fs::write(d.config(), "{ not json").unwrap();
    let e = d.run("vae-decode", "sd1_vae_decode");
    assert!(
        e.contains("config.json") && e.contains("not valid JSON"),
        "{e}"
    );
}

#[test]
fn nonexistent_paths() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    let o = forward_at(
        std::path::Path::new("/no/such/model"),
        "unet",
        &golden("sd1_unet.in.safetensors"),
        &out,
        &[],
    );
    let e = expect_error(&o);
    assert!(e.contains("/no/such/model"), "{e}");
    let o = forward_at(
        &fixtures().join("sd1"),
        "unet",
        std::path::Path::new("/no/such/inputs.safetensors"),
        &out,
        &[],
    );
    let e = expect_error(&o);
    assert!(
        e.contains("/no/such/inputs.safetensors") && e.contains("cannot open"),
        "{e}"
    );
    // A pipeline folder without the requested component.
    let o = forward_at(
        &fixtures().join("sd1"),
        "controlnet",
        &golden("sd1_controlnet.in.safetensors"),
        &out,
        &[],
    );
    let e = expect_error(&o);
    assert!(e.contains("no `controlnet` component"), "{e}");
    assert!(!out.exists());
}

#[test]
fn unwritable_output_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("missing-dir/out.safetensors");
    let o = forward_at(
        &fixtures().join("sd1"),
        "vae-decode",
        &golden("sd1_vae_decode.in.safetensors"),
        &out,
        &[],
    );
    let e = expect_error(&o);
    assert!(
        e.contains("missing-dir/out.safetensors") && e.contains("cannot write"),
        "{e}"
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing written"
    );
}

#[test]
fn wrong_input_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("in.safetensors");
    write_f32(
        &p,
        &[(
            "latent".into(),
            toffee::tensor::Tensor::zeros(vec![4, 4, 4]),
        )],
    )
    .unwrap();
    let o = forward_at(
        &fixtures().join("sd1"),
        "vae-decode",
        &p,
        &dir.path().join("o.safetensors"),
        &[],
    );
    let e = expect_error(&o);
    assert!(
        e.contains("in.safetensors") && e.contains("`latent`") && e.contains("rank 4"),
        "{e}"
    );
    write_f32(
        &p,
        &[(
            "latent".into(),
            toffee::tensor::Tensor::zeros(vec![1, 3, 4, 4]),
        )],
    )
    .unwrap();
    let o = forward_at(
        &fixtures().join("sd1"),
        "vae-decode",
        &p,
        &dir.path().join("o.safetensors"),
        &[],
    );
    let e = expect_error(&o);
    assert!(e.contains("latent has 3 channels"), "{e}");
}

#[test]
fn sharded_index_pointing_at_a_missing_shard() {
    let d = Damaged::new("sd2/unet");
    let idx = d
        .model
        .join("diffusion_pytorch_model.safetensors.index.json");
    let text = std::fs::read_to_string(&idx).unwrap();
    let shard = Path::new(&text[text.find("diffusion_pytorch_model-").unwrap()..])
        .to_str()
        .unwrap()[..]
        .split('"')
        .next()
        .unwrap()
        .to_string();
    std::fs::remove_file(d.model.join(&shard)).unwrap();
    let e = d.run("unet", "sd2_unet");
    assert!(e.contains(&shard) && e.contains("cannot open"), "{e}");
}
