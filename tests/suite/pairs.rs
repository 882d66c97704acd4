//! `toffee pairs` on the built-in models: shards in the WebDataset convention, determinism across
//! batch sizes and workers, resume after kill -9, disjoint sharding + merge, bad input, disk full.

use crate::common::{expect_error, expect_setup_error, stderr, toffee};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

fn pairs(out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["pairs", "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    toffee(&args)
}

fn ok(o: std::process::Output) -> std::process::Output {
    assert!(o.status.success(), "{}", stderr(&o));
    o
}

/// index.jsonl as key → line.
fn index(dir: &Path) -> BTreeMap<String, serde_json::Value> {
    std::fs::read_to_string(dir.join("index.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["key"].as_str().unwrap().to_string(), v)
        })
        .collect()
}

/// Every file of every shard: name → bytes.
fn shard_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "tar") {
            let mut ar = tar::Archive::new(std::fs::File::open(&p).unwrap());
            for f in ar.entries().unwrap() {
                let mut f = f.unwrap();
                let name = f.path().unwrap().to_string_lossy().into_owned();
                let mut b = Vec::new();
                std::io::Read::read_to_end(&mut f, &mut b).unwrap();
                assert!(out.insert(name.clone(), b).is_none(), "{name} twice");
            }
        }
    }
    out
}

/// Decoded PNGs agree within one 8-bit level and JSON scores within 1e-4 (batching may reorder
/// float sums); everything else byte for byte.
fn assert_same_records(a: &Path, b: &Path) {
    let (ia, ib) = (index(a), index(b));
    assert_eq!(ia.keys().collect::<Vec<_>>(), ib.keys().collect::<Vec<_>>());
    for (k, la) in &ia {
        let lb = &ib[k];
        for f in ["prompt", "seed", "kept", "shard", "template"] {
            assert_eq!(la[f], lb[f], "{k}: {f}");
        }
        for s in ["dino", "clip_i", "clip_t"] {
            let (x, y) = (
                la["scores"][s].as_f64().unwrap(),
                lb["scores"][s].as_f64().unwrap(),
            );
            assert!((x - y).abs() < 1e-4, "{k}: {s} {x} vs {y}");
        }
    }
    let (fa, fb) = (shard_files(a), shard_files(b));
    assert_eq!(fa.keys().collect::<Vec<_>>(), fb.keys().collect::<Vec<_>>());
    for (name, x) in &fa {
        if name.ends_with(".png") {
            let (p, q) = (
                image::load_from_memory(x).unwrap(),
                image::load_from_memory(&fb[name]).unwrap(),
            );
            let worst = p
                .as_bytes()
                .iter()
                .zip(q.as_bytes())
                .map(|(u, v)| u.abs_diff(*v))
                .max()
                .unwrap_or(0);
            assert!(worst <= 1, "{name}: images differ by {worst} levels");
        }
    }
}

/// The record schema loaders need (issue 25): every index line has the same fields with one JSON
/// type each (no null), seeds below 2^53; every record in a tar has the same seven members; a
/// record's KEY.json repeats its index line's fields with the same values (floats printed the
/// same way, not widened from f32).
fn check_record_schema(dir: &Path) {
    use serde_json::Value;
    fn kind(v: &Value) -> &'static str {
        match v {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::Number(n) if n.is_u64() || n.is_i64() => "integer",
            Value::Number(_) => "float",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        }
    }
    let idx = index(dir);
    let mut types: Option<BTreeMap<String, &str>> = None;
    for (k, line) in &idx {
        let t: BTreeMap<String, &str> = line
            .as_object()
            .unwrap()
            .iter()
            .map(|(f, v)| (f.clone(), kind(v)))
            .collect();
        assert!(!t.values().any(|&v| v == "null"), "{k}: null in {line}");
        match &types {
            None => types = Some(t),
            Some(first) => assert_eq!(first, &t, "{k}: fields or types differ from the first line"),
        }
        assert!(line["seed"].as_u64().unwrap() < 1 << 53, "{k}: seed");
    }
    let files = shard_files(dir);
    let members = [
        "subject.png",
        "subject_mask.png",
        "target.png",
        "target_mask.png",
        "source.png",
        "edit_mask.png",
        "json",
    ];
    for (k, line) in idx.iter().filter(|(_, l)| l["shard"] != "") {
        for m in members {
            assert!(files.contains_key(&format!("{k}.{m}")), "{k}.{m} missing");
        }
        let meta: Value = serde_json::from_slice(&files[&format!("{k}.json")]).unwrap();
        for f in line.as_object().unwrap().keys().filter(|f| *f != "shard") {
            assert_eq!(meta[f], line[f], "{k}.json `{f}` differs from index.jsonl");
        }
        assert!(meta["view"]["applied"].is_boolean() && meta["view"]["elevation"].is_number());
    }
    let in_tars = files.keys().filter(|f| f.ends_with(".json")).count();
    assert_eq!(in_tars, idx.values().filter(|l| l["shard"] != "").count());
}

#[test]
fn demo_run_writes_webdataset_shards() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    ok(pairs(&out, &[]));
    let stats: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("stats.json")).unwrap()).unwrap();
    assert_eq!(stats["records"], 6);
    assert_eq!(
        stats["kept"].as_u64().unwrap() + stats["rejected"].as_u64().unwrap(),
        6
    );
    let idx = index(&out);
    assert_eq!(idx.len(), 6);
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(
        html.contains("data:image/png;base64"),
        "the run writes its report page"
    );
    // The dataset card: a Hugging Face card header naming the shards, and a row for every
    // member and every index field (each index line has exactly the fields the card lists).
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.starts_with("---\nconfigs:\n"), "{card}");
    assert!(card.contains("path: \"pairs-*.tar\""), "{card}");
    assert!(!card.contains("Partial"), "{card}");
    use toffee::dataset::format::{member, INDEX_FIELDS};
    for (m, _) in member::ALL {
        assert!(card.contains(&format!("| `{m}` |")), "{m}");
    }
    let fields: std::collections::BTreeSet<&str> = INDEX_FIELDS.iter().map(|f| f.0).collect();
    for line in idx.values() {
        let keys: std::collections::BTreeSet<&str> = line
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(keys, fields);
    }
    for f in &fields {
        assert!(card.contains(&format!("| `{f}` |")), "{f}");
    }
    assert!(
        card.contains("[filter]\ndino = 0.0"),
        "the config in full: {card}"
    );
    let files = shard_files(&out);
    for (k, line) in &idx {
        assert_eq!(k.len(), 16);
        assert!(k.chars().all(|c| c.is_ascii_hexdigit()));
        let kept = line["kept"].as_bool().unwrap();
        for ext in [
            "subject.png",
            "subject_mask.png",
            "target.png",
            "target_mask.png",
            "json",
            "source.png",
            "edit_mask.png",
        ] {
            assert_eq!(files.contains_key(&format!("{k}.{ext}")), kept, "{k}.{ext}");
        }
        if kept {
            let meta: serde_json::Value =
                serde_json::from_slice(&files[&format!("{k}.json")]).unwrap();
            assert_eq!(meta["prompt"], line["prompt"]);
            assert!(
                meta["models"]["draft"].is_string()
                    && meta["settings"]["refine"]["strength"].is_number()
            );
            let t = image::load_from_memory(&files[&format!("{k}.target.png")]).unwrap();
            assert_eq!((t.width(), t.height()), (128, 128));
        }
    }
    // Python's tarfile reads the shards; WebDataset groups files by the key before the first dot.
    let script = format!(
        "import tarfile, glob, collections\n\
         groups = collections.defaultdict(set)\n\
         for p in sorted(glob.glob('{}/pairs-*.tar')):\n\
         \x20   with tarfile.open(p) as t:\n\
         \x20       for m in t.getmembers():\n\
         \x20           assert m.isfile()\n\
         \x20           key, ext = m.name.split('.', 1)\n\
         \x20           groups[key].add(ext)\n\
         print(len(groups), sorted(set(map(frozenset, groups.values())), key=len)[-1] == frozenset(['subject.png','subject_mask.png','target.png','target_mask.png','source.png','edit_mask.png','json']))\n",
        out.display()
    );
    match Command::new("python3").args(["-c", &script]).output() {
        Ok(o) if o.status.success() => {
            let kept = idx.values().filter(|l| l["kept"] == true).count();
            assert_eq!(
                String::from_utf8_lossy(&o.stdout).trim(),
                format!("{kept} True")
            );
        }
        Ok(o) => panic!("python3 tarfile: {}", String::from_utf8_lossy(&o.stderr)),
        Err(_) => eprintln!("skipped: no python3 for the tarfile check"),
    }
    // A rerun finds every shard done and changes nothing.
    let before = shard_files(&out);
    let o = ok(pairs(&out, &[]));
    assert!(
        stderr(&o).contains("0 shard(s) built, 2 already done"),
        "{}",
        stderr(&o)
    );
    assert_eq!(before, shard_files(&out));
}

#[test]
fn results_do_not_depend_on_batch_size_or_workers() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    ok(pairs(&a, &["--keep-rejected"]));
    ok(pairs(&b, &["--keep-rejected", "--batch", "1"]));
    ok(pairs(&c, &["--keep-rejected", "--devices", "cpu,cpu"]));
    check_record_schema(&a);
    assert!(
        index(&a).values().any(|l| l["kept"] == false),
        "the demo rejects some records: the schema check covers both kinds"
    );
    assert_same_records(&a, &b);
    assert_same_records(&a, &c);
}

#[test]
fn sharded_processes_cover_every_record_once_and_merge() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    ok(pairs(&out, &["--shard-index", "1", "--num-shards", "2"]));
    // Half the shards: stats.json and the report say the folder is partial (issue 25).
    let stats = |d: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("stats.json")).unwrap()).unwrap()
    };
    let s = stats(&out);
    assert_eq!(
        (s["shards_finished"].clone(), s["shards_expected"].clone()),
        (1.into(), 2.into())
    );
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(
        html.contains("Partial: 1 of 2 shards finished"),
        "no partial warning"
    );
    let card = |d: &Path| std::fs::read_to_string(d.join("README.md")).unwrap();
    assert!(card(&out).contains("**Partial: 1 of 2 shards finished.**"));
    // Not finished: merge refuses and says which shard is missing.
    let e = expect_error(&toffee(&["pairs", "merge", out.to_str().unwrap()]));
    assert!(e.contains("pairs-000000"), "{e}");
    // The other slice from the Slurm environment.
    let o = Command::new(env!("CARGO_BIN_EXE_toffee"))
        .args(["pairs", "--out", out.to_str().unwrap()])
        .env("SLURM_ARRAY_TASK_ID", "0")
        .env("SLURM_ARRAY_TASK_COUNT", "2")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    ok(toffee(&["pairs", "merge", out.to_str().unwrap()]));
    let s = stats(&out);
    assert_eq!(s["shards_finished"], 2);
    assert!(!card(&out).contains("Partial"), "merge rewrites the card");
    // Two processes one after the other: elapsed time is the union of the shards' intervals,
    // so at most their summed work and at least the longer shard.
    let f = |k: &str| s[k].as_f64().unwrap();
    let shard = |i: usize| -> f64 {
        let p = out.join(format!("pairs-{i:06}.stats.json"));
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        v["seconds"].as_f64().unwrap()
    };
    assert!((f("work_seconds") - (shard(0) + shard(1))).abs() < 1e-9);
    // (seconds is rounded to milliseconds)
    assert!(
        f("seconds") <= f("work_seconds") + 2e-3 && f("seconds") >= shard(0).max(shard(1)) - 2e-3
    );
    assert!((f("pairs_per_hour") - f("kept") / f("seconds") * 3600.0).abs() < 1e-6);
    let whole = dir.path().join("whole");
    ok(pairs(&whole, &[]));
    assert_same_records(&out, &whole);
}

/// The run's elapsed time counts processes working side by side once and the gap between a
/// stop and its resumption not at all; the work is summed separately.
#[test]
fn run_totals_are_elapsed_time_and_real_throughput() {
    use toffee::dataset::format::{elapsed, Stats};
    assert_eq!(
        elapsed([(0.0, 10.0), (5.0, 12.0), (20.0, 21.0)].into_iter()),
        13.0
    );
    assert_eq!(elapsed([(3.0, 4.0), (0.0, 10.0)].into_iter()), 10.0);
    assert_eq!(elapsed(std::iter::empty()), 0.0);
    let shard = |started: f64, seconds: f64, kept: usize| Stats {
        records: kept,
        kept,
        seconds,
        work_seconds: seconds,
        started,
        finished: started + seconds,
        ..Stats::default()
    };
    // Two processes side by side for an hour, then one resumed a day later for half an hour.
    let t = Stats::total(&[
        shard(1000.0, 3600.0, 10),
        shard(1000.0, 3600.0, 10),
        shard(90_000.0, 1800.0, 10),
    ]);
    assert_eq!((t.seconds, t.work_seconds), (5400.0, 9000.0));
    assert_eq!((t.started, t.finished), (1000.0, 91_800.0));
    assert_eq!(t.pairs_per_hour, 20.0);
}

/// kill -9 at several points, then rerun: the result equals an uninterrupted run.
#[test]
fn resume_after_kill_loses_nothing_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole");
    ok(pairs(&whole, &["--batch", "1"]));
    for (i, delay_ms) in [150u64, 900, 1800].iter().enumerate() {
        let out = dir.path().join(format!("killed{i}"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_toffee"))
            .args(["pairs", "--batch", "1", "--out", out.to_str().unwrap()])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(*delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        ok(pairs(&out, &["--batch", "1"]));
        let leftovers: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp."))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        assert_same_records(&out, &whole);
    }
}

#[test]
fn bad_subjects_are_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let subjects = dir.path().join("subjects");
    std::fs::create_dir(&subjects).unwrap();
    let rgba = image::RgbaImage::from_fn(40, 40, |x, y| {
        let inside = (x as i32 - 20).pow(2) + (y as i32 - 20).pow(2) < 150;
        image::Rgba([200, 40, 40, if inside { 255 } else { 0 }])
    });
    rgba.save(subjects.join("ball.png")).unwrap();
    image::RgbImage::from_pixel(30, 20, image::Rgb([10, 200, 10]))
        .save(subjects.join("box.png"))
        .unwrap();
    image::GrayImage::from_pixel(30, 20, image::Luma([255]))
        .save(subjects.join("box.mask.png"))
        .unwrap();
    std::fs::write(subjects.join("broken.png"), b"not a png").unwrap();
    image::RgbImage::from_pixel(30, 30, image::Rgb([9, 9, 200]))
        .save(subjects.join("cup.png"))
        .unwrap();
    image::GrayImage::from_pixel(10, 10, image::Luma([255]))
        .save(subjects.join("cup.mask.png"))
        .unwrap();
    let out = dir.path().join("out");
    let o = ok(pairs(&out, &["--subjects", subjects.to_str().unwrap()]));
    let e = stderr(&o);
    assert!(
        e.contains("broken.png") && e.contains("cup.mask.png"),
        "{e}"
    );
    let stats: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("stats.json")).unwrap()).unwrap();
    assert_eq!(stats["skipped_subjects"]["unreadable"], 1);
    assert_eq!(stats["skipped_subjects"]["mask_size"], 1);
    assert_eq!(stats["records"], 4, "two good subjects × 2 prompts");
    let subjects_seen: BTreeSet<String> = index(&out)
        .values()
        .map(|l| l["subject"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        subjects_seen,
        ["ball", "box"].iter().map(|s| s.to_string()).collect()
    );
}

#[test]
fn bad_config_fails_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let cfg = dir.path().join("pairs.toml");
    std::fs::write(&cfg, "[job]\nresolution = 100\n").unwrap();
    let e = expect_setup_error(&pairs(&out, &["--config", cfg.to_str().unwrap()]));
    assert!(e.contains("pairs.toml") && e.contains("resolution"), "{e}");
    std::fs::write(&cfg, "[draft]\nstepz = 3\n").unwrap();
    let e = expect_setup_error(&pairs(&out, &["--config", cfg.to_str().unwrap()]));
    assert!(e.contains("pairs.toml") && e.contains("stepz"), "{e}");
    std::fs::write(
        &cfg,
        "[models]\ndraft = \"nowhere/sd\"\ncontrolnet = \"c\"\nrefiner_adapter = \"a\"\ndino = \"d\"\nclip = \"e\"\n",
    )
    .unwrap();
    let e = expect_setup_error(&pairs(&out, &["--config", cfg.to_str().unwrap()]));
    assert!(e.contains("nowhere/sd"), "{e}");
    std::fs::write(&cfg, "[models]\ndraft = \"x\"\n").unwrap();
    let e = expect_setup_error(&pairs(&out, &["--config", cfg.to_str().unwrap()]));
    assert!(e.contains("controlnet") && e.contains("dino"), "{e}");
    assert!(!out.join("pairs-000000.tar").exists());
    // --print-config writes the defaults, which read back as a valid config.
    let o = ok(toffee(&["pairs", "--print-config"]));
    std::fs::write(&cfg, &o.stdout).unwrap();
    let c = toffee::dataset::config::PairsConfig::read(&cfg).unwrap();
    assert_eq!(c, toffee::dataset::config::PairsConfig::default());
    // A resumed run with other settings is refused, naming the field.
    let demo = dir.path().join("demo");
    ok(pairs(&demo, &["--shard-index", "0", "--num-shards", "9"]));
    let e = expect_setup_error(&pairs(&demo, &["--keep-rejected"]));
    assert!(e.contains("job.json") && e.contains("keep_rejected"), "{e}");
    // A folder of the earlier record format (job.json without `format`: other seeds and keys)
    // is another job too: resuming it would mix two schemes.
    let jp = demo.join("job.json");
    let mut job: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&jp).unwrap()).unwrap();
    job.as_object_mut().unwrap().remove("format");
    std::fs::write(&jp, job.to_string()).unwrap();
    let e = expect_setup_error(&pairs(&demo, &["--shard-index", "0", "--num-shards", "9"]));
    assert!(e.contains("`format` was 1 and is now 2"), "{e}");
}

/// Issue 25: a run that fails its setup — a device that does not open, models that do not load —
/// exits 2 and writes no job.json, so the folder stays free for the corrected run (it was claimed
/// before the device check, and the next run was refused as "another job").
#[test]
fn a_failed_setup_does_not_claim_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let e = expect_setup_error(&pairs(&out, &["--devices", "cuda:99"]));
    assert!(e.contains("cuda:99"), "{e}");
    assert!(!out.join("job.json").exists());
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let cfg = dir.path().join("pairs.toml");
    let models = ["draft", "controlnet", "refiner_adapter", "dino", "clip"]
        .map(|m| format!("{m} = {:?}\n", empty.to_str().unwrap()))
        .concat();
    std::fs::write(&cfg, format!("[models]\n{models}")).unwrap();
    let e = expect_setup_error(&pairs(&out, &["--config", cfg.to_str().unwrap()]));
    assert!(e.contains("empty"), "{e}");
    assert!(!out.join("job.json").exists());
    ok(pairs(
        &out,
        &["--keep-rejected", "--shard-index", "0", "--num-shards", "9"],
    ));
    assert!(out.join("job.json").is_file());
}

/// A full disk stops the run with a clear message; finished shards stay intact.
#[test]
fn disk_full_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mnt) = crate::common::small_tmpfs(dir.path(), "160k") else {
        return;
    };
    let out = mnt.join("out");
    let o = pairs(&out, &["--keep-rejected"]);
    let e = stderr(&o);
    // Committed shards are whole tars; no temporary file is left behind.
    let names: Vec<String> = std::fs::read_dir(&out)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    for n in names.iter().filter(|n| n.ends_with(".tar")) {
        let mut ar = tar::Archive::new(std::fs::File::open(out.join(n)).unwrap());
        assert!(ar.entries().unwrap().all(|e| e.is_ok()), "{n} is damaged");
    }
    assert!(!names.iter().any(|n| n.contains(".tmp.")), "{names:?}");
    let _ = Command::new("umount").arg(&mnt).status();
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    assert!(
        e.contains("No space left") || e.contains("disk full"),
        "{e}"
    );
}

/// Every subject unusable is a failure (exit 1, naming why), not a successful run of nothing.
#[test]
fn a_job_with_no_usable_subject_fails() {
    let dir = tempfile::tempdir().unwrap();
    let subjects = dir.path().join("subjects");
    std::fs::create_dir(&subjects).unwrap();
    std::fs::write(subjects.join("broken.png"), b"not a png").unwrap();
    std::fs::write(subjects.join("empty.jpg"), b"").unwrap();
    let out = dir.path().join("out");
    let o = pairs(&out, &["--subjects", subjects.to_str().unwrap()]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("toffee: error:")
            && e.contains("no usable subject")
            && e.contains("unreadable: 2"),
        "{e}"
    );
}

/// A run claims its shards: while another holds them (here this test process, through the
/// library), `toffee pairs` into the folder is refused before it touches it (issue 27 item 2).
#[test]
fn shards_being_built_by_another_run_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let held = toffee::dataset::lock::claim(&out, &[1]).unwrap();
    let e = expect_setup_error(&pairs(&out, &[]));
    assert!(
        e.contains("shard 1") && e.contains("another run into this folder"),
        "{e}"
    );
    assert!(
        !out.join("job.json").exists(),
        "the refused run claimed the folder"
    );
    // Array tasks: a slice without shard 1 runs beside the holder.
    ok(pairs(&out, &["--shard-index", "0", "--num-shards", "2"]));
    drop(held);
    ok(pairs(&out, &[]));
    let whole = dir.path().join("whole");
    ok(pairs(&whole, &[]));
    assert_same_records(&out, &whole);
}

/// Two runs started at once into one folder: of the same job, each shard is built once and the
/// folder equals a single run's; of two jobs, one is refused and job.json names the other.
#[test]
fn two_runs_started_at_once_never_mix() {
    let dir = tempfile::tempdir().unwrap();
    let subjects = dir.path().join("subjects");
    std::fs::create_dir(&subjects).unwrap();
    let png = crate::common::fixtures().join("zero123/subject.png");
    std::fs::copy(png, subjects.join("robot.png")).unwrap();
    let start = |out: &Path, extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_toffee"))
            .args(["pairs", "--batch", "1", "--out", out.to_str().unwrap()])
            .args(extra)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let same = dir.path().join("same");
    let (a, b) = (start(&same, &[]), start(&same, &[]));
    let outs = [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()];
    for o in &outs {
        let e = stderr(o);
        match o.status.code() {
            Some(0) => {}
            Some(2) => assert!(e.contains("another run into this folder"), "{e}"),
            c => panic!("{c:?}: {e}"),
        }
    }
    assert!(outs.iter().any(|o| o.status.success()));
    ok(pairs(&same, &[]));
    let whole = dir.path().join("whole");
    ok(pairs(&whole, &[]));
    assert_same_records(&same, &whole);

    let mixed = dir.path().join("mixed");
    let other = ["--subjects", subjects.to_str().unwrap()];
    let (a, b) = (start(&mixed, &[]), start(&mixed, &other));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(
        a.status.success() != b.status.success(),
        "exactly one job runs: {}\n{}",
        stderr(&a),
        stderr(&b)
    );
    let loser = if a.status.success() { &b } else { &a };
    let e = expect_setup_error(loser);
    assert!(
        e.contains("another job") || e.contains("another run into this folder"),
        "{e}"
    );
    // job.json names the job that ran: its command resumes, the other's is refused.
    let (won, lost): (&[&str], &[&str]) = match a.status.success() {
        true => (&[], &other),
        false => (&other, &[]),
    };
    ok(pairs(&mixed, won));
    let e = expect_setup_error(&pairs(&mixed, lost));
    assert!(e.contains("another job"), "{e}");
}

/// Ctrl-C: the batch in flight finishes, the unfinished shard is dropped (no temporary file),
/// exit status 3; a rerun completes the job.
#[test]
fn ctrl_c_stops_cleanly_and_the_rerun_completes() {
    signal_stops_cleanly_and_the_rerun_completes(libc::SIGINT, false);
}

/// Ctrl-C twice: the second exits at once (130), removing the unfinished shard's temporary file.
#[test]
fn a_second_ctrl_c_exits_at_once_and_leaves_no_temporary() {
    signal_stops_cleanly_and_the_rerun_completes(libc::SIGINT, true);
}

/// SIGTERM (Slurm's time limit, scancel, preemption; Kubernetes evictions) and SIGHUP take the
/// same clean path as Ctrl-C.
#[test]
fn sigterm_and_sighup_stop_cleanly_and_the_rerun_completes() {
    signal_stops_cleanly_and_the_rerun_completes(libc::SIGTERM, false);
    signal_stops_cleanly_and_the_rerun_completes(libc::SIGHUP, false);
}

fn signal_stops_cleanly_and_the_rerun_completes(signal: i32, twice: bool) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let child = Command::new(env!("CARGO_BIN_EXE_toffee"))
        .args(["pairs", "--batch", "1", "--out", out.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the job has started (job.json is written before any model loads).
    let start = std::time::Instant::now();
    while !out.join("job.json").exists() && start.elapsed().as_secs() < 30 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    // Safety: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, signal) };
    if twice {
        std::thread::sleep(std::time::Duration::from_millis(100));
        // Safety: as above (the child may have exited: then the signal goes nowhere).
        unsafe { libc::kill(child.id() as i32, signal) };
    }
    let o = child.wait_with_output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    let codes: &[i32] = if twice { &[130, 3, 0] } else { &[3, 0] };
    assert!(
        o.status.code().is_some_and(|c| codes.contains(&c)),
        "{:?}: {e}",
        o.status
    );
    if o.status.code() != Some(0) {
        assert!(e.contains("rerun"), "{e}");
    }
    let tmp: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp."))
        .collect();
    assert!(tmp.is_empty(), "{tmp:?}");
    ok(pairs(&out, &["--batch", "1"]));
    let whole = dir.path().join("whole");
    ok(pairs(&whole, &[]));
    assert_same_records(&out, &whole);
}

/// A pairs job on checkpoints from disk (`draft`, `controlnet`: the SD1 fixture pipeline and its
/// ControlNet as folders or single files; an IP-Adapter as the Refiner's adapter, DINOv2 and CLIP
/// for the filter), subjects from a folder. Returns the output folder's shard files.
fn pairs_job(dir: &Path, draft: &Path, controlnet: &Path) -> BTreeMap<String, Vec<u8>> {
    pairs_job_with(dir, draft, controlnet, "")
}

/// `pairs_job` with TOML lines added to the [draft] table (and any tables after them).
fn pairs_job_with(
    dir: &Path,
    draft: &Path,
    controlnet: &Path,
    draft_extra: &str,
) -> BTreeMap<String, Vec<u8>> {
    let f = crate::common::fixtures();
    let p = |s: &str| f.join(s).display().to_string();
    let cfg = dir.join("pairs.toml");
    std::fs::write(
        &cfg,
        format!(
            "[models]\ndraft = \"{}\"\ncontrolnet = \"{}\"\nrefiner_adapter = \"{}\"\nrefiner_adapter_encoder = \"{}\"\n\
             dino = \"{}\"\nclip = \"{}\"\n\n[job]\nresolution = 64\nprompts_per_subject = 2\nshard_size = 2\nbatch = 2\n\n\
             [draft]\nsteps = 2\n{draft_extra}\n\n[refine]\nsteps = 4\nmask_dilation = 2\n\n[filter]\ndino = -1.0\nclip_i = -1.0\nclip_t = -1.0\n",
            draft.display(),
            controlnet.display(),
            p("adapters/ip-adapter-sd1.safetensors"),
            p("vision/clip-vision-proj"),
            p("vision/dinov2"),
            p("vision/clip"),
        ),
    )
    .unwrap();
    let subjects = dir.join("subjects");
    std::fs::create_dir(&subjects).unwrap();
    std::fs::copy(
        f.join("zero123/subject.png"),
        subjects.join("toy_robot.png"),
    )
    .unwrap();
    let out = dir.join("out");
    ok(pairs(
        &out,
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--subjects",
            subjects.to_str().unwrap(),
        ],
    ));
    let idx = index(&out);
    assert_eq!(idx.len(), 2);
    assert!(idx
        .values()
        .all(|l| l["kept"] == true && l["prompt"].as_str().unwrap().contains("toy robot")));
    let files = shard_files(&out);
    let k = idx.keys().next().unwrap();
    let meta: serde_json::Value = serde_json::from_slice(&files[&format!("{k}.json")]).unwrap();
    assert_eq!(
        meta["models"]["draft"].as_str().unwrap(),
        draft.display().to_string(),
        "{meta}"
    );
    let t = image::load_from_memory(&files[&format!("{k}.target.png")]).unwrap();
    assert_eq!((t.width(), t.height()), (64, 64));
    files
}

#[test]
fn pairs_on_model_folders() {
    let dir = tempfile::tempdir().unwrap();
    let f = crate::common::fixtures();
    pairs_job(dir.path(), &f.join("sd1"), &f.join("controlnet-sd1"));
}

/// The same job on single-file checkpoints (the draft pipeline and the ControlNet) gives the same
/// images as on the folders they were made from.
#[test]
fn pairs_on_single_files_equal_pairs_on_folders() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let f = crate::common::fixtures();
    let folder = pairs_job(a.path(), &f.join("sd1"), &f.join("controlnet-sd1"));
    let single = pairs_job(
        b.path(),
        &f.join("single_file/sd1.safetensors"),
        &f.join("single_file/controlnet-sd1.safetensors"),
    );
    let pngs: Vec<&String> = folder.keys().filter(|k| k.ends_with(".png")).collect();
    assert!(pngs.len() >= 4, "{pngs:?}");
    for k in pngs {
        assert!(
            folder[k] == single[k],
            "{k} differs between folder and single-file models"
        );
    }
}

/// `--bench` counts UNet evaluations per record (per sample: a CFG step counts 2): the default
/// recipe's shape with CFG, and the same with guidance 1 (one UNet batch per step) — the few-step
/// recipes' other saving.
#[test]
fn bench_counts_unet_evaluations_per_record() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, guidance: f32| -> serde_json::Value {
        let cfg = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "[job]\nresolution = 64\nprompts_per_subject = 1\nshard_size = 4\nbatch = 4\n\n\
                 [draft]\nsteps = 3\nscheduler = \"ddim\"\nguidance = {guidance}\n\n\
                 [refine]\nsteps = 4\nstrength = 0.5\nscheduler = \"ddim\"\nguidance = {guidance}\n\n\
                 [view]\nprobability = 0.0\n\n[filter]\ndino = -1.0\nclip_i = -1.0\nclip_t = -1.0\n"
            ),
        )
        .unwrap();
        let o = ok(pairs(
            &dir.path().join(name),
            &["--config", cfg.to_str().unwrap(), "--bench"],
        ));
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap()
    };
    // draft 3 steps + refine 4 × 0.5 = 2 steps, each ×2 with CFG
    let cfg = run("cfg", 7.5);
    assert_eq!(cfg["unet_evaluations_per_record"], 10.0, "{cfg}");
    let no_cfg = run("nocfg", 1.0);
    assert_eq!(no_cfg["unet_evaluations_per_record"], 5.0, "{no_cfg}");
    assert_eq!(
        cfg["unet_evaluations"].as_u64().unwrap(),
        10 * cfg["records"].as_u64().unwrap()
    );
}

/// Per-stage LoRAs: the draft fuses one (relative to the config), the Refiner none, so it gets
/// its own copy of the model; the targets (refined drafts) change, the job completes.
#[test]
fn pairs_with_a_draft_lora() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let f = crate::common::fixtures();
    std::fs::copy(
        f.join("lora/sd1-peft.safetensors"),
        b.path().join("style.safetensors"),
    )
    .unwrap();
    let plain = pairs_job(a.path(), &f.join("sd1"), &f.join("controlnet-sd1"));
    let lora = pairs_job_with(
        b.path(),
        &f.join("sd1"),
        &f.join("controlnet-sd1"),
        "lora = [\"style.safetensors:0.8\"]",
    );
    let targets: Vec<&String> = plain
        .keys()
        .filter(|k| k.ends_with(".target.png"))
        .collect();
    assert!(
        !targets.is_empty(),
        "{:?}",
        plain.keys().collect::<Vec<_>>()
    );
    assert!(
        targets.iter().any(|k| plain[*k] != lora[*k]),
        "the draft LoRA changed no target"
    );
    // a missing LoRA file is a config error before any work
    let cfg = b.path().join("bad.toml");
    std::fs::write(&cfg, "[draft]\nlora = [\"nope.safetensors\"]\n").unwrap();
    let e = expect_setup_error(&pairs(
        &b.path().join("o2"),
        &["--config", cfg.to_str().unwrap()],
    ));
    assert!(
        e.contains("bad.toml") && e.contains("nope.safetensors"),
        "{e}"
    );
}

/// Subjects without a mask file or alpha get one from their name when a segmenter is configured
/// (CLIPSeg + SAM fixtures with the built-in generation models); masks that are empty or cover
/// the whole image skip the subject with that reason.
#[test]
fn unmasked_subjects_are_masked_from_their_name() {
    use toffee::pipeline::mask::{MaskSettings, MaskVerdict, Segmenter};
    let f = crate::common::fixtures();
    let dir = tempfile::tempdir().unwrap();
    let subjects = dir.path().join("subjects");
    std::fs::create_dir(&subjects).unwrap();
    std::fs::copy(f.join("images/photo.jpg"), subjects.join("cat.jpg")).unwrap();
    image::RgbImage::from_pixel(30, 20, image::Rgb([10, 200, 10]))
        .save(subjects.join("box.png"))
        .unwrap();
    image::GrayImage::from_pixel(30, 20, image::Luma([255]))
        .save(subjects.join("box.mask.png"))
        .unwrap();
    let seg_dir = f.join("segment_depth/clipseg");
    let sam_dir = f.join("segment_depth/sam");
    let run = |name: &str, mask_toml: &str| -> (std::path::PathBuf, serde_json::Value) {
        let cfg = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "[models]\nsegmenter = \"{}\"\nsam = \"{}\"\n\n[mask]\n{mask_toml}\n\n\
                 [job]\nresolution = 64\nprompts_per_subject = 1\nshard_size = 2\nbatch = 2\n\n\
                 [draft]\nsteps = 2\n\n[refine]\nsteps = 2\n\n[view]\nprobability = 0.0\n\n\
                 [filter]\ndino = -1.0\nclip_i = -1.0\nclip_t = -1.0\n",
                seg_dir.display(),
                sam_dir.display()
            ),
        )
        .unwrap();
        let out = dir.path().join(name);
        ok(pairs(
            &out,
            &[
                "--config",
                cfg.to_str().unwrap(),
                "--subjects",
                subjects.to_str().unwrap(),
            ],
        ));
        let stats = serde_json::from_str(&std::fs::read_to_string(out.join("stats.json")).unwrap())
            .unwrap();
        (out, stats)
    };

    // The default settings: the made mask is the recipe's, written as the record's subject mask.
    let seg = Segmenter::load(
        &seg_dir,
        Some(&sam_dir),
        MaskSettings::default(),
        &toffee::backend::Device::Cpu,
    )
    .unwrap();
    let img = toffee::image_proc::load_rgb8(&subjects.join("cat.jpg")).unwrap();
    let want = seg.segment(&img, "cat").unwrap();
    assert_eq!(want.verdict, MaskVerdict::Ok, "area {}", want.area());
    let (out, stats) = run("made", "");
    assert_eq!(stats["records"], 2, "{stats}");
    let files = shard_files(&out);
    let idx = index(&out);
    let (key, _) = idx.iter().find(|(_, l)| l["subject"] == "cat").unwrap();
    let got = image::load_from_memory(&files[&format!("{key}.subject_mask.png")])
        .unwrap()
        .to_luma8();
    assert_eq!(got.into_raw(), want.to_gray().into_raw());

    // Nothing reaches the threshold: the cat is skipped as empty, the masked box still runs.
    let (_, stats) = run("empty", "threshold = 0.99999");
    assert_eq!(stats["skipped_subjects"]["empty_mask"], 1, "{stats}");
    assert_eq!(stats["records"], 1);
    // Everything does, and the bound is below it: the cat is skipped as the whole image.
    let (_, stats) = run("whole", "threshold = 0.0\nmin_area = 0.0\nmax_area = 0.001");
    assert_eq!(stats["skipped_subjects"]["mask_whole_image"], 1, "{stats}");
}

/// `--profile` writes a Chrome trace whose spans read like the job and the model: the stages,
/// the model calls and the UNet blocks.
#[test]
fn profile_writes_a_chrome_trace_of_stages_models_and_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace.json");
    let out = dir.path().join("out");
    ok(pairs(&out, &["--profile", trace.to_str().unwrap()]));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let names: BTreeSet<String> = v
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["name"].as_str().map(String::from))
        .collect();
    for want in [
        "view",
        "draft",
        "refine",
        "score",
        "generate",
        "step",
        "encode_text",
        "text_encoder",
        "unet",
        "down_block",
        "mid_block",
        "up_block",
        "controlnet",
        "vae.decode",
        "image_encoder",
    ] {
        assert!(names.contains(want), "no `{want}` span in {names:?}");
    }
    // A trace file that cannot be created is an error before any work.
    let e = expect_setup_error(&pairs(
        &dir.path().join("out2"),
        &["--profile", "/nonexistent/dir/trace.json"],
    ));
    assert!(
        e.contains("--profile") && e.contains("/nonexistent/dir/trace.json"),
        "{e}"
    );
}

/// A legitimately tiny placement (`place.scale` 0.01 at 64²) can leave a target mask with no
/// pixel: that record is rejected (`empty_target_mask`), not the whole shard failed (issue 27).
#[test]
fn an_empty_target_mask_rejects_its_record_only() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tiny.toml");
    std::fs::write(
        &cfg,
        "[job]\nresolution = 64\nprompts_per_subject = 1\nshard_size = 4\nbatch = 2\n\
         [draft]\nsteps = 2\n[refine]\nsteps = 2\n[view]\nprobability = 0.0\n\
         [place]\nscale_min = 0.01\nscale_max = 0.01\n\
         [filter]\ndino = -1.0\nclip_i = -1.0\nclip_t = -1.0\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    ok(pairs(
        &out,
        &["--config", cfg.to_str().unwrap(), "--keep-rejected"],
    ));
    let stats: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("stats.json")).unwrap()).unwrap();
    assert!(
        stats["rejections"]["empty_target_mask"].as_u64() >= Some(1),
        "{stats}"
    );
    let empty: Vec<_> = index(&out)
        .into_values()
        .filter(|l| l["reason"] == "empty_target_mask")
        .collect();
    assert!(!empty.is_empty() && empty.iter().all(|l| l["kept"] == false));
    assert_eq!(
        stats["records"],
        stats["kept"].as_u64().unwrap() + stats["rejected"].as_u64().unwrap()
    );
}
