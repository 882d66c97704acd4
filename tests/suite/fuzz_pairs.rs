//! Property-based fuzzing of the pairs job's inputs (issue 27 item 10): its TOML config, the
//! subject JSONL and a finished run folder handed to `pairs merge`. As in `fuzz`, the only
//! acceptable outcomes are a value or a clean error; each property also asserts what an
//! accepted input guarantees.

use proptest::prelude::*;
use proptest::test_runner::Config as PtConfig;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use toffee::dataset::config::PairsConfig;

fn cases(default: u32) -> PtConfig {
    crate::common::proptest_cases(default)
}

/// A TOML value meant to break a check: absurd, non-finite, negative, of the wrong type.
fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "0",
            "-1",
            "1",
            "8",
            "65",
            "4097",
            "16385",
            "4294967296",
            "18446744073709551615",
            "9223372036854775807",
            "-9223372036854775808",
            "nan",
            "inf",
            "-inf",
            "1e300",
            "-0.0",
            "0.5",
            "1e-300",
            "\"\"",
            "\"x\"",
            "[]",
            "[nan]",
            "[1e9, -1e9]",
            "true",
            "{}",
        ])
        .prop_map(str::to_string),
        any::<f64>().prop_map(|x| format!("{x:?}")),
        any::<i64>().prop_map(|x| x.to_string()),
    ]
}

/// The default config with up to three of its values replaced.
fn hostile_config() -> impl Strategy<Value = String> {
    let text = PairsConfig::default_toml();
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    prop::collection::vec((any::<prop::sample::Index>(), toml_value()), 1..4).prop_map(
        move |edits| {
            let mut lines = lines.clone();
            let keyed: Vec<usize> = (0..lines.len())
                .filter(|&i| lines[i].contains(" = ") && !lines[i].starts_with('#'))
                .collect();
            for (pick, value) in edits {
                let i = keyed[pick.index(keyed.len())];
                let key = lines[i].split(" = ").next().unwrap().to_string();
                lines[i] = format!("{key} = {value}");
            }
            lines.join("\n")
        },
    )
}

/// A subject JSONL line: a valid object with hostile fields, or garbage.
fn subject_line() -> impl Strategy<Value = String> {
    let name = prop_oneof![
        Just(String::new()),
        Just("cup".to_string()),
        Just("Cup".to_string()),
        Just("CUP".to_string()),
        "[a-zA-Z ./\\\\é\u{0}-\u{1f}]{0,12}",
    ];
    prop_oneof![
        4 => (name.clone(), prop::option::of(name.clone()), prop::option::of(name))
            .prop_map(|(image, n, c)| {
                let mut o = serde_json::json!({ "image": format!("{image}.png") });
                if let Some(n) = n { o["name"] = n.into(); }
                if let Some(c) = c { o["category"] = c.into(); }
                o.to_string()
            }),
        1 => "[ -~]{0,40}",
        1 => Just(r#"{"image": "a.png", "extra": 1}"#.to_string()),
        1 => Just(r#"{"image": 7}"#.to_string()),
    ]
}

/// A finished demo run (two processes' shards), made once for every case.
fn finished_run() -> &'static Path {
    static RUN: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, out) = RUN.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        let o = crate::common::toffee(&["pairs", "--out", out.to_str().unwrap()]);
        assert!(o.status.success(), "{}", crate::common::stderr(&o));
        (dir, out)
    });
    out
}

/// One damage to a run folder.
#[derive(Clone, Debug)]
enum Damage {
    Flip {
        file: prop::sample::Index,
        at: prop::sample::Index,
        byte: u8,
    },
    Truncate {
        file: prop::sample::Index,
        keep: prop::sample::Index,
    },
    DuplicateLine {
        file: prop::sample::Index,
        line: prop::sample::Index,
    },
    Delete {
        file: prop::sample::Index,
    },
}

fn damage() -> impl Strategy<Value = Damage> {
    let i = any::<prop::sample::Index>;
    prop_oneof![
        (i(), i(), any::<u8>()).prop_map(|(file, at, byte)| Damage::Flip { file, at, byte }),
        (i(), i()).prop_map(|(file, keep)| Damage::Truncate { file, keep }),
        (i(), i()).prop_map(|(file, line)| Damage::DuplicateLine { file, line }),
        i().prop_map(|file| Damage::Delete { file }),
    ]
}

/// The files of a run that merge reads: job.json and every shard's tar, index and stats.
fn merge_inputs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n == "job.json" || n.starts_with("pairs-")
        })
        .collect();
    v.sort();
    v
}

/// Applies `d`; returns whether it certainly changed what merge must verify (a deleted file, a
/// duplicated index line, a cut tar or index).
fn apply(dir: &Path, d: &Damage) -> bool {
    let files = merge_inputs(dir);
    let pick = |f: &prop::sample::Index| files[f.index(files.len())].clone();
    match d {
        Damage::Flip { file, at, byte } => {
            let p = pick(file);
            let mut b = std::fs::read(&p).unwrap();
            if !b.is_empty() {
                let i = at.index(b.len());
                b[i] = *byte;
                std::fs::write(&p, b).unwrap();
            }
            false
        }
        Damage::Truncate { file, keep } => {
            let p = pick(file);
            let b = std::fs::read(&p).unwrap();
            let n = if b.is_empty() { 0 } else { keep.index(b.len()) };
            std::fs::write(&p, &b[..n]).unwrap();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            // Cutting a tar inside its end-of-archive zeros, or a stats file, may leave it whole.
            name.ends_with(".jsonl") && b[n..].iter().any(|c| !c.is_ascii_whitespace())
        }
        Damage::DuplicateLine { file, line } => {
            let jsonl: Vec<PathBuf> = files
                .iter()
                .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
                .cloned()
                .collect();
            let p = &jsonl[file.index(jsonl.len())];
            let text = std::fs::read_to_string(p).unwrap();
            let lines: Vec<&str> = text.lines().collect();
            if lines.is_empty() {
                return false;
            }
            let l = lines[line.index(lines.len())];
            std::fs::write(p, format!("{text}{l}\n")).unwrap();
            true
        }
        Damage::Delete { file } => {
            let p = pick(file);
            std::fs::remove_file(&p).unwrap();
            // A shard's tar may be absent legitimately only when its index is empty.
            !p.to_string_lossy().ends_with(".tar")
        }
    }
}

proptest! {
    #![proptest_config(cases(64))]

    /// Read and checked like `toffee pairs --check`: an accepted config has finite numbers and
    /// sizes within the bounds txt2img uses.
    #[test]
    fn pairs_configs_with_hostile_values(text in hostile_config()) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pairs.toml");
        std::fs::write(&p, &text).unwrap();
        if let Ok(c) = PairsConfig::read(&p).and_then(|c| c.check("pairs.toml").map(|()| c)) {
            prop_assert!(c.job.resolution <= 16384 && c.job.resolution % 8 == 0);
            prop_assert!((1..=4096).contains(&c.job.batch));
            prop_assert!(c.draft.guidance.is_finite() && c.refine.guidance.is_finite());
            prop_assert!(c.refine.strength > 0.0 && c.refine.strength <= 1.0);
            prop_assert!(c.filter.dino.is_finite() && c.view.guidance.is_finite());
        }
    }

    /// An accepted subject list has non-empty names and categories, unique ignoring case.
    #[test]
    fn subject_lists_with_hostile_lines(lines in prop::collection::vec(subject_line(), 0..6)) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("subjects.jsonl");
        std::fs::write(&p, lines.join("\n")).unwrap();
        if let Ok(subjects) = toffee::dataset::plan::read_subjects(&p) {
            let mut seen = std::collections::BTreeSet::new();
            for s in &subjects {
                prop_assert!(!s.name.is_empty() && !s.category.is_empty());
                prop_assert!(seen.insert(s.name.to_lowercase()), "{} twice", s.name);
            }
        }
    }
}

proptest! {
    #![proptest_config(cases(24))]

    /// A damaged run folder: merge fails cleanly or succeeds; damage it must see is an error.
    #[test]
    fn merge_of_a_damaged_run(d in damage()) {
        let dir = tempfile::tempdir().unwrap();
        crate::common::copy_tree(finished_run(), dir.path());
        let must_fail = apply(dir.path(), &d);
        let r = toffee::dataset::merge::merge(dir.path());
        if must_fail {
            prop_assert!(r.is_err(), "{d:?} was merged");
        }
    }
}
