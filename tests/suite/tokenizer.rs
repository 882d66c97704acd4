//! CLIP tokenizer against transformers 5 goldens (tests/fixtures/golden/tokenizer.json).

use std::path::{Path, PathBuf};

use serde_json::Value;
use toffee::tokenizer::ClipTokenizer;

const EOS_PAD: &str = "tokenizers/clip-eos-pad";
const BANG_PAD_JSON: &str = "tokenizers/clip-bang-pad-json";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

struct Case {
    tokenizer: String,
    prompt: String,
    ids: Vec<u32>,
}

fn golden_cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixtures().join("golden/tokenizer.json")).unwrap();
    let json: Value = serde_json::from_str(&text).unwrap();
    json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            tokenizer: c["tokenizer"].as_str().unwrap().to_string(),
            prompt: c["prompt"].as_str().unwrap().to_string(),
            ids: c["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|id| id.as_u64().unwrap() as u32)
                .collect(),
        })
        .collect()
}

/// Asserts `tok` reproduces every golden case of `folder`; returns how many there were.
fn check_golden(tok: &ClipTokenizer, folder: &str) -> usize {
    let cases: Vec<Case> = golden_cases()
        .into_iter()
        .filter(|c| c.tokenizer == folder)
        .collect();
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|case| {
            let ids = tok.encode(&case.prompt).unwrap();
            (ids != case.ids)
                .then(|| format!("{:?}\n  want {:?}\n  got  {:?}", case.prompt, case.ids, ids))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{folder}: {} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    cases.len()
}

fn load(folder: &str) -> ClipTokenizer {
    ClipTokenizer::from_dir(&fixtures().join(folder)).unwrap()
}

#[test]
fn golden_cases_cover_both_folders() {
    let cases = golden_cases();
    for folder in [EOS_PAD, BANG_PAD_JSON] {
        assert!(cases.iter().any(|c| c.tokenizer == folder), "{folder}");
    }
    assert!(cases
        .iter()
        .all(|c| c.tokenizer == EOS_PAD || c.tokenizer == BANG_PAD_JSON));
}

#[test]
fn vocab_merges_folder_matches_transformers() {
    assert!(check_golden(&load(EOS_PAD), EOS_PAD) > 0);
}

#[test]
fn tokenizer_json_folder_matches_transformers() {
    assert!(check_golden(&load(BANG_PAD_JSON), BANG_PAD_JSON) > 0);
}

#[test]
fn single_file_constructors_match_transformers() {
    let dir = fixtures().join(EOS_PAD);
    let tok = ClipTokenizer::from_vocab_merges(
        &dir.join("vocab.json"),
        &dir.join("merges.txt"),
        "<|endoftext|>",
    )
    .unwrap();
    check_golden(&tok, EOS_PAD);
    let path = fixtures().join(BANG_PAD_JSON).join("tokenizer.json");
    check_golden(
        &ClipTokenizer::from_tokenizer_json(&path, "!").unwrap(),
        BANG_PAD_JSON,
    );
}

#[test]
fn special_ids_and_length() {
    let eos_pad = load(EOS_PAD);
    assert_eq!(
        (eos_pad.bos_id(), eos_pad.eos_id(), eos_pad.pad_id()),
        (49406, 49407, 49407)
    );
    assert_eq!(eos_pad.max_length(), 77);
    // SD 2 pads with "!", id 0 in CLIP's vocabulary.
    let bang = load(BANG_PAD_JSON);
    assert_eq!(
        (bang.bos_id(), bang.eos_id(), bang.pad_id()),
        (49406, 49407, 0)
    );
    assert_eq!(bang.max_length(), 77);
}

#[test]
fn encode_batch_matches_encode() {
    let tok = load(BANG_PAD_JSON);
    let prompts = ["a cat", "", "wow!!! amazing!"];
    let batch = tok.encode_batch(&prompts).unwrap();
    assert_eq!(batch.len(), prompts.len());
    for (prompt, ids) in prompts.iter().zip(&batch) {
        assert_eq!(*ids, tok.encode(prompt).unwrap());
    }
}

/// A writable copy of a fixture folder.
fn copy_folder(folder: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixtures().join(folder)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, tmp.path().join(path.file_name().unwrap())).unwrap();
    }
    tmp
}

fn error_of(result: anyhow::Result<ClipTokenizer>) -> String {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn from_dir_prefers_tokenizer_json() {
    // Broken slow-tokenizer files beside tokenizer.json must not be read.
    let tmp = copy_folder(BANG_PAD_JSON);
    std::fs::write(tmp.path().join("vocab.json"), "{ not json").unwrap();
    std::fs::write(tmp.path().join("merges.txt"), "a b c\n").unwrap();
    check_golden(&ClipTokenizer::from_dir(tmp.path()).unwrap(), BANG_PAD_JSON);

    // ... and a tokenizer.json, when present, is what gets read.
    let tmp = copy_folder(EOS_PAD);
    std::fs::write(tmp.path().join("tokenizer.json"), "[]").unwrap();
    let err = error_of(ClipTokenizer::from_dir(tmp.path()));
    assert!(err.contains("tokenizer.json"), "{err}");
}

#[test]
fn model_max_length_from_config() {
    let tmp = copy_folder(EOS_PAD);
    let config_path = tmp.path().join("tokenizer_config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    let write = |config: &Value| std::fs::write(&config_path, config.to_string()).unwrap();

    config["model_max_length"] = 16.into();
    write(&config);
    let tok = ClipTokenizer::from_dir(tmp.path()).unwrap();
    let ids = tok.encode(&"cat ".repeat(40)).unwrap();
    assert_eq!(ids.len(), 16);
    assert_eq!((ids[0], ids[15]), (tok.bos_id(), tok.eos_id()));

    // transformers' "no limit" sentinel falls back to CLIP's 77 positions.
    config["model_max_length"] = serde_json::from_str("1000000000000000019884624838656").unwrap();
    write(&config);
    assert_eq!(
        ClipTokenizer::from_dir(tmp.path()).unwrap().max_length(),
        77
    );
}

/// model_max_length values that cannot work are errors naming the file and the field; values
/// above CLIP's 77 positions (real files carry transformers' sentinel) still mean 77.
#[test]
fn bad_model_max_length_is_an_error() {
    let tmp = copy_folder(EOS_PAD);
    let config_path = tmp.path().join("tokenizer_config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    for bad in ["0", "-5", "1", "\"77\"", "null", "7.5"] {
        config["model_max_length"] = serde_json::from_str(bad).unwrap();
        std::fs::write(&config_path, config.to_string()).unwrap();
        let err = error_of(ClipTokenizer::from_dir(tmp.path()));
        assert!(
            err.contains("tokenizer_config.json") && err.contains("model_max_length"),
            "{bad}: {err}"
        );
    }
    for (fine, want) in [
        ("77", 77),
        ("77.0", 77),
        ("512", 77),
        ("1e30", 77),
        ("2", 2),
    ] {
        config["model_max_length"] = serde_json::from_str(fine).unwrap();
        std::fs::write(&config_path, config.to_string()).unwrap();
        let tok = ClipTokenizer::from_dir(tmp.path()).unwrap();
        assert_eq!(tok.max_length(), want, "{fine}");
    }
}

/// A start, end or pad token missing from the vocabulary would get an id past it (one the text
/// encoder has no row for): an error naming the token and where it was named.
#[test]
fn special_tokens_missing_from_the_vocabulary_are_errors() {
    // The end token gone from vocab.json (CLIP's default names it).
    let tmp = copy_folder(EOS_PAD);
    let vocab_path = tmp.path().join("vocab.json");
    let mut vocab: Value =
        serde_json::from_str(&std::fs::read_to_string(&vocab_path).unwrap()).unwrap();
    vocab.as_object_mut().unwrap().remove("<|endoftext|>");
    std::fs::write(&vocab_path, vocab.to_string()).unwrap();
    let err = error_of(ClipTokenizer::from_dir(tmp.path()));
    assert!(
        err.contains("<|endoftext|>") && err.contains("tokenizer_config.json"),
        "{err}"
    );
    let err = error_of(ClipTokenizer::from_vocab_merges(
        &vocab_path,
        &tmp.path().join("merges.txt"),
        "!",
    ));
    assert!(
        err.contains("<|endoftext|>") && err.contains("vocab.json"),
        "{err}"
    );

    // A pad token named in the configs that the vocabulary lacks.
    let tmp = copy_folder(BANG_PAD_JSON);
    for file in ["tokenizer_config.json", "special_tokens_map.json"] {
        let p = tmp.path().join(file);
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        v["pad_token"] = "<|pad|>".into();
        std::fs::write(&p, v.to_string()).unwrap();
    }
    let err = error_of(ClipTokenizer::from_dir(tmp.path()));
    assert!(
        err.contains("pad_token")
            && err.contains("<|pad|>")
            && err.contains("tokenizer_config.json"),
        "{err}"
    );
    let err = error_of(ClipTokenizer::from_tokenizer_json(
        &tmp.path().join("tokenizer.json"),
        "<|pad|>",
    ));
    assert!(
        err.contains("<|pad|>") && err.contains("tokenizer.json"),
        "{err}"
    );
}

#[test]
fn missing_folder_is_an_error() {
    let err = error_of(ClipTokenizer::from_dir(Path::new("/nonexistent/tokenizer")));
    assert!(
        err.contains("/nonexistent/tokenizer") && err.contains("does not exist"),
        "{err}"
    );
}

#[test]
fn corrupt_vocab_is_an_error() {
    let tmp = copy_folder(EOS_PAD);
    std::fs::write(tmp.path().join("vocab.json"), "{\"a\": 1,").unwrap();
    let err = error_of(ClipTokenizer::from_dir(tmp.path()));
    assert!(
        err.contains("vocab.json") && err.contains("not valid JSON"),
        "{err}"
    );

    std::fs::write(tmp.path().join("vocab.json"), "{\"a\": \"one\"}").unwrap();
    let err = error_of(ClipTokenizer::from_dir(tmp.path()));
    assert!(err.contains("vocab.json") && err.contains("\"a\""), "{err}");
}

#[test]
fn missing_merges_is_an_error() {
    let tmp = copy_folder(EOS_PAD);
    std::fs::remove_file(tmp.path().join("merges.txt")).unwrap();
    let err = error_of(ClipTokenizer::from_dir(tmp.path()));
    assert!(
        err.contains("merges.txt") && err.contains("cannot read"),
        "{err}"
    );
}

#[test]
fn bad_merges_are_errors() {
    let tmp = copy_folder(EOS_PAD);
    let merges = tmp.path().join("merges.txt");
    std::fs::write(&merges, "#version: 0.2\ni n\nthree parts here\n").unwrap();
    let err = error_of(ClipTokenizer::from_dir(tmp.path()));
    assert!(
        err.contains("merges.txt") && err.contains("merge 3"),
        "{err}"
    );

    std::fs::write(&merges, "#version: 0.2\nnot_a_token x\n").unwrap();
    let err = error_of(ClipTokenizer::from_dir(tmp.path()));
    assert!(
        err.contains("merges.txt") && err.contains("not_a_token"),
        "{err}"
    );
}

#[test]
fn corrupt_tokenizer_json_is_an_error() {
    let tmp = copy_folder(BANG_PAD_JSON);
    let path = tmp.path().join("tokenizer.json");
    std::fs::write(&path, "{\"model\": {\"vocab\": {}}}").unwrap();
    let err = error_of(ClipTokenizer::from_dir(tmp.path()));
    assert!(
        err.contains("tokenizer.json") && err.contains("merges"),
        "{err}"
    );

    std::fs::write(&path, "").unwrap();
    let err = error_of(ClipTokenizer::from_tokenizer_json(&path, "!"));
    assert!(
        err.contains("tokenizer.json") && err.contains("not valid JSON"),
        "{err}"
    );
}

#[test]
fn single_file_constructors_name_missing_files() {
    let dir = fixtures().join(EOS_PAD);
    let err = error_of(ClipTokenizer::from_vocab_merges(
        &dir.join("vocab.json"),
        &dir.join("no-merges.txt"),
        "!",
    ));
    assert!(err.contains("no-merges.txt"), "{err}");
    let err = error_of(ClipTokenizer::from_tokenizer_json(
        &dir.join("tokenizer.json"),
        "!",
    ));
    assert!(
        err.contains("tokenizer.json") && err.contains("cannot read"),
        "{err}"
    );
}
