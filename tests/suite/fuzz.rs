//! Property-based fuzzing of everything that reads untrusted bytes: safetensors headers, model
//! configs, the tokenizer and image decoding. Each property asserts the only acceptable outcomes —
//! a value or a clean error — so a panic, an abort on an absurd allocation or a hang fails it.
//! CI runs a bounded number of cases; `PROPTEST_CASES=100000 cargo test --release --test suite fuzz::`
//! runs longer (README, "Fuzzing"). A crash found here becomes a named regression test below.

use crate::common::fixtures;
use proptest::prelude::*;
use proptest::test_runner::Config as PtConfig;
use std::io::Write;
use std::path::{Path, PathBuf};
use toffee::backend::Device;
use toffee::config::Config;
use toffee::weights::safetensors::SafetensorsFile;
use toffee::weights::WeightStore;

fn cases(default: u32) -> PtConfig {
    crate::common::proptest_cases(default)
}

fn temp_file(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
    p
}

/// Reads every tensor of a file that opened: a header that passed validation must not make a read
/// panic or run out of the mapped bytes.
fn open_and_read(p: &Path) {
    if let Ok(f) = SafetensorsFile::open(p) {
        for name in f.tensors.keys() {
            let _ = f.read_f32(name);
        }
    }
}

fn safetensors_bytes(header: &str, data: usize) -> Vec<u8> {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend(std::iter::repeat_n(0u8, data));
    b
}

/// A header entry with adversarial but well-typed fields (the semantic checks, not the JSON
/// parser, are what this reaches).
fn entry() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec!["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8", "X"]),
        prop::collection::vec(
            prop_oneof![
                0u64..5,
                Just(u32::MAX as u64),
                Just(u64::MAX),
                1u64..100_000
            ],
            0..5,
        ),
        prop_oneof![0u64..64, Just(u64::MAX - 3)],
        prop_oneof![0u64..128, Just(u64::MAX)],
    )
        .prop_map(|(dt, shape, a, b)| {
            format!(r#"{{"dtype":"{dt}","shape":{shape:?},"data_offsets":[{a},{b}]}}"#)
        })
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn safetensors_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let d = tempfile::tempdir().unwrap();
        open_and_read(&temp_file(&d, "x.safetensors", &bytes));
    }

    #[test]
    fn safetensors_structured_headers(
        entries in prop::collection::vec(("[a-c]{1,2}", entry()), 0..4),
        meta in any::<bool>(),
        data in 0usize..96,
        claimed in prop_oneof![Just(None), Just(Some(u64::MAX)), (0u64..2000).prop_map(Some)],
    ) {
        let mut fields: Vec<String> = entries.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        if meta {
            fields.push(r#""__metadata__":{"format":"pt"}"#.into());
        }
        let header = format!("{{{}}}", fields.join(","));
        let mut bytes = safetensors_bytes(&header, data);
        if let Some(n) = claimed {
            bytes[..8].copy_from_slice(&n.to_le_bytes());
        }
        let d = tempfile::tempdir().unwrap();
        open_and_read(&temp_file(&d, "x.safetensors", &bytes));
    }

    #[test]
    fn safetensors_mutated_real_file(edits in prop::collection::vec((0usize..2544, any::<u8>()), 1..6)) {
        let mut bytes = std::fs::read(fixtures().join("golden/sd1_text_encoder.in.safetensors")).unwrap();
        for (i, b) in edits {
            let i = i % bytes.len();
            bytes[i] = b;
        }
        let d = tempfile::tempdir().unwrap();
        open_and_read(&temp_file(&d, "x.safetensors", &bytes));
    }

    #[test]
    fn tokenizer_any_text(text in any::<String>()) {
        let tok = toffee::tokenizer::ClipTokenizer::from_dir(&fixtures().join("tokenizers/clip-eos-pad")).unwrap();
        let ids = tok.encode(&text);
        let ids = ids.expect("any text tokenizes");
        prop_assert_eq!(ids.len(), tok.max_length());
    }
}

/// Real configs with one field replaced by an adversarial value: loading against the real tiny
/// weights gives a model or an error, never a panic or a giant allocation.
fn config_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::json;
    prop_oneof![
        Just(json!(null)),
        Just(json!(0)),
        Just(json!(-1)),
        Just(json!(1)),
        Just(json!(3)),
        Just(json!(u64::MAX)),
        Just(json!(1e308)),
        Just(json!(-1e-5)),
        Just(json!(0.5)),
        Just(json!("x")),
        Just(json!([])),
        Just(json!([0])),
        Just(json!([1, 2, 3, 4, 5, 6, 7])),
        Just(json!([u32::MAX])),
        Just(json!({})),
        Just(json!(true)),
    ]
}

fn load_with_field(folder: &str, field_pick: usize, value: serde_json::Value) {
    let dir = fixtures().join(folder);
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let mut json: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text).unwrap();
    let keys: Vec<String> = json
        .keys()
        .filter(|k| !k.starts_with('_'))
        .cloned()
        .collect();
    let key = keys[field_pick % keys.len()].clone();
    json.insert(key, value);
    let cfg = Config::from_json("fuzzed config.json", serde_json::Value::Object(json)).unwrap();
    let weights = toffee::weights::layout::open_weights(&dir).unwrap();
    let _ = match folder {
        "sd1/unet" | "sdxl/unet" => {
            toffee::models::unet::Unet::load(&cfg, &weights, &Device::Cpu).map(drop)
        }
        "sd1/vae" => toffee::models::vae::Vae::load(&cfg, &weights, &Device::Cpu).map(drop),
        _ => {
            let mut w = weights;
            toffee::models::load::normalise_text_encoder(&mut w);
            toffee::models::clip_text::ClipText::load(&cfg, &w, &Device::Cpu).map(drop)
        }
    };
}

proptest! {
    #![proptest_config(cases(96))]

    #[test]
    fn configs_with_a_hostile_field(
        folder in prop::sample::select(vec!["sd1/unet", "sdxl/unet", "sd1/vae", "sd1/text_encoder"]),
        pick in 0usize..64,
        value in config_value(),
    ) {
        load_with_field(folder, pick, value);
    }

    #[test]
    fn images_mutated(
        which in prop::sample::select(vec!["images/photo.jpg", "images/canny_shapes.png", "images/gray.jpg"]),
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in prop::option::of(any::<usize>()),
    ) {
        let mut bytes = std::fs::read(fixtures().join(which)).unwrap();
        for (i, b) in edits {
            let n = bytes.len();
            bytes[i % n] = b;
        }
        if let Some(c) = cut {
            let n = bytes.len();
            bytes.truncate(c % n);
        }
        let d = tempfile::tempdir().unwrap();
        let ext = which.rsplit('.').next().unwrap();
        let _ = toffee::image_io::load(&temp_file(&d, &format!("x.{ext}"), &bytes));
    }
}

/// The random store synthesises any shape a config asks for: configs whose sizes are absurd must
/// be refused by the bounds before anything is made.
#[test]
fn random_weights_never_follow_absurd_configs() {
    let dir = fixtures().join("sd1/unet");
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let mut json: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text).unwrap();
    json.insert(
        "block_out_channels".into(),
        serde_json::json!([1 << 20, 1 << 20]),
    );
    let cfg = Config::from_json("huge config.json", serde_json::Value::Object(json)).unwrap();
    let r = toffee::models::unet::Unet::load(&cfg, &WeightStore::random(0), &Device::Cpu);
    assert!(r.is_err(), "a UNet with 2^20 channels was built");
}
