//! The pairs report (`toffee::dataset::report`) on a synthetic run folder: two WebDataset shards
//! made with the `tar` crate, holding solid-colour PNGs per role (subject red, target blue,
//! source green, masks black and white), an index with kept records and one rejected record per
//! reason, stats.json and job.json. Checks the page is self-contained and escaped, the error
//! messages, and renders it in headless Chromium to see the thumbnails and charts really draw.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use image::{ImageFormat, Luma, Rgb, RgbImage};
use serde_json::json;
use toffee::dataset::report::{write_report, HISTOGRAM_BAR_RGB, THUMB_PX};

const RED: [u8; 3] = [255, 0, 0];
const BLUE: [u8; 3] = [0, 0, 255];
const GREEN: [u8; 3] = [0, 200, 0];
const EVIL_PROMPT: &str = "a toy <script>alert(\"x\")</script> & friends on a beach";

struct Rec {
    key: &'static str,
    shard: Option<&'static str>,
    kept: bool,
    reason: Option<&'static str>,
    taxonomy: &'static str,
    edit: bool,
    prompt: &'static str,
    scores: [f64; 3],
}

fn records() -> Vec<Rec> {
    let rec = |key, shard, kept, reason, taxonomy, edit, prompt, scores| Rec {
        key,
        shard,
        kept,
        reason,
        taxonomy,
        edit,
        prompt,
        scores,
    };
    let s0 = Some("pairs-000000.tar");
    let s1 = Some("pairs-000001.tar");
    vec![
        rec(
            "00000000000000a1",
            s0,
            true,
            None,
            "background",
            true,
            "a red toy in a forest",
            [0.82, 0.88, 0.31],
        ),
        rec(
            "00000000000000a2",
            s0,
            true,
            None,
            "style",
            false,
            "a red toy, watercolour",
            [0.74, 0.85, 0.29],
        ),
        rec(
            "00000000000000b1",
            s0,
            false,
            Some("dino"),
            "texture",
            false,
            "a red toy made of wood",
            [0.41, 0.80, 0.30],
        ),
        rec(
            "00000000000000a3",
            s1,
            true,
            None,
            "colour",
            false,
            EVIL_PROMPT,
            [0.79, 0.90, 0.33],
        ),
        rec(
            "00000000000000b2",
            s1,
            false,
            Some("clip_i"),
            "background",
            false,
            "a red toy on a table",
            [0.66, 0.61, 0.28],
        ),
        rec(
            "00000000000000b3",
            None,
            false,
            Some("clip_t"),
            "style",
            false,
            "a red toy, pixel art",
            [0.70, 0.83, 0.18],
        ),
    ]
}

fn png_rgb(colour: [u8; 3]) -> Vec<u8> {
    let img = RgbImage::from_pixel(160, 120, Rgb(colour));
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png).unwrap();
    out.into_inner()
}

/// Black with a white rectangle in the middle.
fn png_mask() -> Vec<u8> {
    let img = image::GrayImage::from_fn(160, 120, |x, y| {
        let inside = (40..120).contains(&x) && (30..90).contains(&y);
        Luma([if inside { 255 } else { 0 }])
    });
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png).unwrap();
    out.into_inner()
}

fn write_shard(path: &Path, recs: &[&Rec]) {
    let mut builder = tar::Builder::new(std::fs::File::create(path).unwrap());
    let mut add = |name: String, bytes: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, name, bytes).unwrap();
    };
    for r in recs {
        add(format!("{}.subject.png", r.key), &png_rgb(RED));
        add(format!("{}.subject_mask.png", r.key), &png_mask());
        if r.edit {
            add(format!("{}.source.png", r.key), &png_rgb(GREEN));
        }
        add(format!("{}.target.png", r.key), &png_rgb(BLUE));
        add(format!("{}.target_mask.png", r.key), &png_mask());
        add(
            format!("{}.json", r.key),
            json!({"key": r.key, "kept": r.kept}).to_string().as_bytes(),
        );
    }
    builder.into_inner().unwrap();
}

fn write_json(path: &Path, value: impl serde::Serialize) {
    std::fs::write(path, serde_json::to_string_pretty(&value).unwrap()).unwrap();
}

/// A finished `toffee pairs --keep-rejected` folder: 6 records, 5 of them in 2 shards, its files
/// written through the format's own types (`dataset::format`).
fn make_run() -> tempfile::TempDir {
    use toffee::dataset::format::{IndexLine, JobFile, Stats};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let recs = records();
    let mut index = String::new();
    for r in &recs {
        let line = IndexLine {
            key: r.key.into(),
            shard: r.shard.unwrap_or_default().into(),
            subject: "toy_robot".into(),
            prompt: r.prompt.into(),
            template: "a {} in a forest".into(),
            taxonomy: r.taxonomy.into(),
            seed: 1234,
            scores: toffee::pipeline::score::Scores {
                dino: r.scores[0] as f32,
                clip_i: r.scores[1] as f32,
                clip_t: r.scores[2] as f32,
            },
            kept: r.kept,
            reason: r.reason.unwrap_or_default().into(),
            edit: r.edit,
        };
        index.push_str(&serde_json::to_string(&line).unwrap());
        index.push('\n');
    }
    std::fs::write(dir.join("index.jsonl"), index).unwrap();
    let counts = |records: usize, kept: usize| Stats {
        records,
        kept,
        rejected: records - kept,
        ..Stats::default()
    };
    for (i, shard) in ["pairs-000000.tar", "pairs-000001.tar"]
        .into_iter()
        .enumerate()
    {
        let in_shard: Vec<&Rec> = recs.iter().filter(|r| r.shard == Some(shard)).collect();
        write_shard(&dir.join(shard), &in_shard);
        let kept = in_shard.iter().filter(|r| r.kept).count();
        write_json(
            &dir.join(format!("pairs-{i:06}.stats.json")),
            counts(3, kept),
        );
    }
    let map = |kv: &[(&str, usize)]| kv.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let mut stats = Stats {
        rejections: map(&[("dino", 1), ("clip_i", 1), ("clip_t", 1)]),
        skipped_subjects: map(&[("unreadable", 2), ("mask_size", 1)]),
        thresholds: [("dino", 0.6), ("clip_i", 0.7), ("clip_t", 0.25)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        seconds: 90.0,
        pairs_per_hour: 120.0,
        device: "cuda:0".into(),
        shards_finished: Some(2),
        shards_expected: Some(2),
        ..counts(6, 3)
    };
    let t = &mut stats.stage_seconds;
    (t.load, t.draft, t.refine, t.score, t.write) = (1.5, 40.0, 35.0, 8.0, 2.5);
    write_json(&dir.join("stats.json"), &stats);
    write_json(
        &dir.join("job.json"),
        JobFile {
            format: toffee::dataset::format::FORMAT_VERSION,
            toffee_version: "0.1.0-test".into(),
            // 6 records in shards of 3: the 2 shards written above (job.json is checked on read).
            config: {
                let mut c = toffee::dataset::config::PairsConfig::default();
                c.job.shard_size = 3;
                c
            },
            subjects: "subjects/".into(),
            subject_names_digest: "0".into(),
            records: 6,
            shards: 2,
            keep_rejected: true,
        },
    );
    tmp
}

fn report(dir: &Path) -> (toffee::dataset::report::ReportSummary, String, PathBuf) {
    let out = dir.join("report.html");
    let summary = write_report(dir, &out).unwrap();
    let html = std::fs::read_to_string(&out).unwrap();
    (summary, html, out)
}

fn error_of(dir: &Path) -> String {
    let err = write_report(dir, &dir.join("report.html")).expect_err("the report fails");
    assert!(
        !dir.join("report.html").exists(),
        "a failed report leaves no page"
    );
    format!("{err:#}")
}

/// The `src="…"` of the first `<img alt="ALT" …>`.
fn img_src<'a>(html: &'a str, alt: &str) -> &'a str {
    let at = html
        .find(&format!("alt=\"{alt}\""))
        .expect("an image with that alt");
    let rest = &html[at..];
    let start = rest.find("src=\"").unwrap() + 5;
    let end = rest[start..].find('"').unwrap();
    &rest[start..start + end]
}

#[test]
fn the_page_is_self_contained_escaped_and_complete() {
    let run = make_run();
    let (summary, html, _) = report(run.path());
    assert_eq!((summary.records, summary.kept, summary.rejected), (6, 3, 3));
    // 3 kept + the 2 rejected kept in shards (b3 was not written); 5 roles for a1 (edit pair), 4 else.
    assert_eq!(summary.shown, 5);
    assert_eq!(summary.images, 21);
    assert!(summary.missing_shards.is_empty());
    assert_eq!(summary.bytes, html.len());

    for remote in [
        "http://", "https://", "src=\"/", "href=", "<script", "<link", "@import",
    ] {
        assert!(
            !html.contains(remote),
            "the page must not contain {remote:?}"
        );
    }
    for (i, _) in html.match_indices("src=\"") {
        assert!(
            html[i + 5..].starts_with("data:image/png;base64,"),
            "a non-data src at {i}"
        );
    }
    for (i, _) in html.match_indices("url(") {
        assert!(
            html[i + 4..].starts_with("data:"),
            "a non-data url() at {i}"
        );
    }
    assert_eq!(html.matches("data:image/png;base64,").count(), 21);

    // The thumbnails are the shards' pictures, downscaled.
    for (alt, colour) in [("subject", RED), ("target", BLUE), ("source", GREEN)] {
        let uri = img_src(&html, alt);
        let b64 = uri.strip_prefix("data:image/png;base64,").unwrap();
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        let img = image::load_from_memory_with_format(&png, ImageFormat::Png)
            .unwrap()
            .to_rgb8();
        assert_eq!((img.width(), img.height()), (THUMB_PX, 96), "{alt}");
        assert!(
            img.pixels().all(|p| p.0 == colour),
            "{alt} thumbnail is solid {colour:?}"
        );
    }

    // One dashed threshold line per histogram, at stats.json's thresholds.
    assert_eq!(html.matches("class=\"threshold\"").count(), 3);
    for t in ["0.600", "0.700", "0.250"] {
        assert!(
            html.contains(&format!("data-threshold=\"{t}\"")),
            "threshold {t}"
        );
        assert!(
            html.contains(&format!("threshold {t}")),
            "threshold label {t}"
        );
    }
    assert!(html.contains("class=\"bar\""));

    // Text is escaped: the prompt's markup comes out as text.
    assert!(html.contains("a toy &lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; friends"));

    // Header, tables, stage bar.
    for text in [
        "cuda:0",
        "50.0%",
        "0.1.0-test",
        "120",
        "unreadable",
        "mask size",
        "CLIP-I",
        "refine",
    ] {
        assert!(html.contains(text), "the page shows {text:?}");
    }
    assert_eq!(
        html.matches("class=\"stage\"").count(),
        5,
        "stages with time (view took none)"
    );
    assert!(html.contains("rejected by <b>dino</b>") && html.contains("rejected by <b>clip_i</b>"));
    assert!(!run
        .path()
        .read_dir()
        .unwrap()
        .any(|e| { e.unwrap().file_name().to_string_lossy().contains(".tmp.") }));
}

#[test]
fn a_missing_shard_is_shown_not_an_error() {
    let run = make_run();
    std::fs::remove_file(run.path().join("pairs-000001.tar")).unwrap();
    let (summary, html, _) = report(run.path());
    assert_eq!(summary.missing_shards, vec!["pairs-000001.tar".to_string()]);
    assert_eq!(summary.shown, 5);
    assert_eq!(
        summary.images,
        5 + 4 + 4,
        "only shard 0's three records have pictures"
    );
    assert!(html.contains("1 missing shard:</b> pairs-000001.tar"));
    assert!(html.contains("shard missing"));
    assert!(html.contains("<tr class=\"missing\"><td>pairs-000001.tar</td><td>missing</td>"));
}

/// `toffee report` prints a summary a person reads (it printed a Rust debug struct), and warns
/// about missing shards.
#[test]
fn the_command_prints_a_human_summary() {
    let run = make_run();
    std::fs::remove_file(run.path().join("pairs-000001.tar")).unwrap();
    let out = run.path().join("page.html");
    let o = Command::new(env!("CARGO_BIN_EXE_toffee"))
        .args([
            "report",
            run.path().to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("6 records, ") && e.contains(" kept, "), "{e}");
    assert!(
        e.contains(
            "warning: 1 shard(s) named by the index but not in the folder: pairs-000001.tar"
        ),
        "{e}"
    );
    assert!(
        !e.contains("ReportSummary") && !e.contains("missing_shards"),
        "{e}"
    );
    assert!(!e.contains("partial"), "{e}");
    // One of two shards finished: the command says the folder is partial.
    let stats = run.path().join("stats.json");
    let text = std::fs::read_to_string(&stats).unwrap();
    std::fs::write(
        &stats,
        text.replace("\"shards_finished\": 2", "\"shards_finished\": 1"),
    )
    .unwrap();
    let o = crate::common::toffee(&[
        "report",
        run.path().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("warning: partial: 1 of 2 shards finished"),
        "{e}"
    );
    // Without --out the page goes into the folder, not the current directory.
    let inside = run.path().join("report.html");
    let _ = std::fs::remove_file(&inside);
    let o = crate::common::toffee(&["report", run.path().to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && inside.is_file(), "{e}");
}

#[test]
fn errors_name_the_file() {
    let run = make_run();
    std::fs::remove_file(run.path().join("index.jsonl")).unwrap();
    let e = error_of(run.path());
    assert!(
        e.contains("index.jsonl") && e.contains("cannot read"),
        "{e}"
    );

    let run = make_run();
    std::fs::remove_file(run.path().join("stats.json")).unwrap();
    let e = error_of(run.path());
    assert!(e.contains("stats.json"), "{e}");

    let run = make_run();
    let index = run.path().join("index.jsonl");
    let mut lines: Vec<String> = std::fs::read_to_string(&index)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    lines[2] = "{\"key\": \"00000000000000b1\", \"kept\": ".into();
    std::fs::write(&index, lines.join("\n")).unwrap();
    let e = error_of(run.path());
    assert!(e.contains("index.jsonl: line 3:"), "{e}");

    // A well-formed line whose shard leaves the folder.
    let run = make_run();
    let index = run.path().join("index.jsonl");
    let first = std::fs::read_to_string(&index).unwrap();
    let first = first.lines().next().unwrap();
    assert!(first.contains("\"shard\":\"pairs-000000.tar\""), "{first}");
    let escape = first.replace("pairs-000000.tar", "../x.tar");
    std::fs::write(&index, escape + "\n").unwrap();
    let e = error_of(run.path());
    assert!(
        e.contains("index.jsonl: line 1:") && e.contains("not a file name"),
        "{e}"
    );
}

#[test]
fn a_corrupt_shard_is_an_error_naming_it() {
    // A header that is not a tar header.
    let run = make_run();
    let shard = run.path().join("pairs-000001.tar");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[..512].fill(b'x');
    std::fs::write(&shard, &bytes).unwrap();
    let e = error_of(run.path());
    assert!(
        e.contains("pairs-000001.tar") && e.contains("corrupt shard"),
        "{e}"
    );

    // A shard cut short inside a picture.
    let run = make_run();
    let shard = run.path().join("pairs-000000.tar");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..512 + 200]).unwrap();
    let e = error_of(run.path());
    assert!(e.contains("pairs-000000.tar"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Headless browser

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

fn find_chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser"].iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// Pixels of the screenshot within ±`tol` of `rgb` in every channel.
fn count_colour(img: &RgbImage, rgb: [u8; 3], tol: u8) -> usize {
    img.pixels()
        .filter(|p| p.0.iter().zip(rgb).all(|(&a, b)| a.abs_diff(b) <= tol))
        .count()
}

#[test]
fn chromium_renders_the_thumbnails_and_charts() {
    let Some(chromium) = find_chromium() else {
        assert!(
            !ci(),
            "CI is set but no chromium was found (install the `chromium` package or set CHROMIUM)"
        );
        println!("skipped: no chromium");
        return;
    };
    let run = make_run();
    let (_, _, page) = report(run.path());
    let shot = run.path().join("shot.png");
    let mut child = Command::new(&chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
        ])
        .args([
            "--no-first-run",
            "--disable-dev-shm-usage",
            "--window-size=1280,2400",
        ])
        .arg(format!(
            "--user-data-dir={}",
            run.path().join("profile").display()
        ))
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("file://{}", page.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromium.display()));
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!(
                "{} did not finish the screenshot in 60 s",
                chromium.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        shot.is_file(),
        "chromium wrote no screenshot ({}): {stderr}",
        out.status
    );
    if let Some(keep) = std::env::var_os("TOFFEE_REPORT_SHOT") {
        std::fs::copy(&shot, keep).unwrap();
    }
    let img = image::open(&shot).unwrap().to_rgb8();
    assert_eq!((img.width(), img.height()), (1280, 2400));
    // 5 subject and 5 target thumbnails of 104×78 px on screen (128×96 shown in a 104 px box).
    let (red, blue) = (count_colour(&img, RED, 6), count_colour(&img, BLUE, 6));
    let teal = count_colour(&img, HISTOGRAM_BAR_RGB, 6);
    println!(
        "chromium {}: red {red}, blue {blue}, histogram bars {teal} pixels ({:.1?})",
        chromium.display(),
        started.elapsed()
    );
    assert!(
        red >= 5 * 104 * 78 * 9 / 10,
        "subject thumbnails rendered: {red} red pixels"
    );
    assert!(
        blue >= 5 * 104 * 78 * 9 / 10,
        "target thumbnails rendered: {blue} blue pixels"
    );
    assert!(teal >= 1500, "histogram bars rendered: {teal} pixels");
}
