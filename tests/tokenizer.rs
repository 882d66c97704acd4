//! CLIP tokenizer against transformers 5 goldens (tests/fixtures/golden/tokenizer.json).

use std::path::{Path, PathBuf};

use serde_json::Value;
use toffee::tokenizer::ClipTokenizer;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

struct Case {
    tokenizer: PathBuf,
    prompt: String,
    ids: Vec<u32>,
}

fn cases(golden: &Path, base: &Path) -> Vec<Case> {
    let text = std::fs::read_to_string(golden).unwrap();
    let json: Value = serde_json::from_str(&text).unwrap();
    json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            tokenizer: base.join(c["tokenizer"].as_str().unwrap()),
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

/// Checks every case, loading each folder once; returns the number of cases checked.
fn check_cases(cases: &[Case]) -> usize {
    let mut loaded: Vec<(PathBuf, ClipTokenizer)> = Vec::new();
    let mut failures = Vec::new();
    for case in cases {
        if !loaded.iter().any(|(dir, _)| *dir == case.tokenizer) {
            let tok = ClipTokenizer::from_dir(&case.tokenizer).unwrap();
            loaded.push((case.tokenizer.clone(), tok));
        }
        let tok = &loaded.iter().find(|(dir, _)| *dir == case.tokenizer).unwrap().1;
        let ids = tok.encode(&case.prompt).unwrap();
        if ids != case.ids {
            failures.push(format!(
                "{} {:?}\n  want {:?}\n  got  {:?}",
                case.tokenizer.display(),
                case.prompt,
                case.ids,
                ids
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    cases.len()
}

#[test]
fn scratch_differential() {
    let Ok(path) = std::env::var("TOKENIZER_CASES") else {
        return;
    };
    let n = check_cases(&cases(Path::new(&path), Path::new("/")));
    eprintln!("{n} cases match");
}
