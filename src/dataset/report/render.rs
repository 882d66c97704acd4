//! The report page: HTML with inline CSS, SVG charts and data-URI thumbnails, no script.

use super::super::format::{IndexLine, Stats};
use super::read::{score, shard_of, Role, Run, Thumbs};
use super::{
    BAR_FAIL, BAR_PASS, HIST_BINS, MAX_SHARD_ROWS, SCORES, STAGE_COLOURS, THRESHOLD_STROKE,
};
use std::collections::BTreeSet;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;

pub(super) const CSS: &str = r#"
body{font:14px/1.45 "DejaVu Sans","Liberation Sans",Helvetica,Arial,sans-serif;margin:24px 32px;color:#1d232a;background:#fff}
h1{font-size:24px;margin:0}
h2{font-size:17px;margin:30px 0 10px;padding-bottom:4px;border-bottom:1px solid #dde2e6}
.sub{color:#5b6670;font-size:12.5px;margin:2px 0 14px;word-break:break-all}
.totals{display:flex;flex-wrap:wrap;gap:10px}
.tot{border:1px solid #dde2e6;border-radius:6px;padding:7px 14px;min-width:104px}
.tot b{display:block;font-size:20px}
.tot span{color:#5b6670;font-size:12px}
.warn{background:#fff5e6;border:1px solid #f0b45a;border-radius:6px;padding:8px 12px;margin:12px 0}
.row{display:flex;flex-wrap:wrap;gap:18px 36px;align-items:flex-start}
figure{margin:0}
figcaption{font-size:12px;color:#5b6670}
table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #dde2e6;padding:3px 9px;text-align:right}
th:first-child,td:first-child{text-align:left}
th{background:#f3f5f7}
tr.missing td{background:#fdecea}
.legend{display:flex;flex-wrap:wrap;gap:4px 16px;font-size:12.5px;margin-top:6px}
.sw{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:5px;vertical-align:-1px}
.sheet{display:grid;grid-template-columns:repeat(auto-fill,minmax(580px,1fr));gap:12px}
.card{border:1px solid #dde2e6;border-radius:6px;padding:8px 10px}
.card.rej{background:#fcf8f7;border-color:#ecd3cf}
.strip{display:flex;gap:6px}
.strip figure{text-align:center}
.strip figcaption{font-size:10.5px}
img.t,.none{width:104px;height:104px;object-fit:contain;background:#eceff1;display:block}
.none{display:flex;align-items:center;justify-content:center;font-size:11px;color:#8a949c;text-align:center}
.prompt{margin:6px 0 2px;font-size:13.5px}
.meta{color:#5b6670;font-size:12px}
.fail{color:#b3261e;font-weight:bold}
.note{color:#5b6670;font-size:12.5px}
"#;

pub(super) fn render(
    run: &Run,
    kept: &[&IndexLine],
    rejected: &[&IndexLine],
    thumbs: &HashMap<String, Thumbs>,
) -> String {
    let mut h = String::with_capacity(1 << 20);
    h.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n");
    h.push_str("<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">\n");
    h.push_str("<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\n");
    h.push_str("<title>toffee pairs report</title>\n<style>");
    h.push_str(CSS);
    h.push_str("</style></head>\n<body>\n");
    render_header(&mut h, run);
    render_histograms(&mut h, run);
    render_tables(&mut h, run);
    render_stages(&mut h, run);
    let missing: HashSet<String> = run.missing_shards().into_iter().collect();
    let n_kept = run.records.iter().filter(|r| r.kept).count();
    let kept_title = format!("Kept pairs ({} of {} shown)", kept.len(), n_kept);
    render_sheet(&mut h, run, &kept_title, kept, thumbs, &missing);
    let rej_title = format!(
        "Rejected pairs ({} of {} shown)",
        rejected.len(),
        run.records.len() - n_kept
    );
    render_sheet(&mut h, run, &rej_title, rejected, thumbs, &missing);
    render_shards(&mut h, run);
    h.push_str("</body></html>\n");
    h
}

pub(super) fn render_header(h: &mut String, run: &Run) {
    let st = &run.stats;
    let (records, kept, rejected) = (st.records as f64, st.kept as f64, st.rejected as f64);
    let ratio = if records > 0.0 {
        format!("{:.1}%", 100.0 * kept / records)
    } else {
        "—".into()
    };
    let shards = run
        .job
        .as_ref()
        .map_or(run.shards.len(), |j| j.shards)
        .to_string();
    let device = match st.device.as_str() {
        "" => "—".to_string(),
        d => d.to_string(),
    };
    let _ = writeln!(h, "<h1>toffee pairs report</h1>");
    let version = run
        .job
        .as_ref()
        .map(|j| format!(" · toffee {}", esc(&j.toffee_version)))
        .unwrap_or_default();
    let _ = writeln!(h, "<div class=\"sub\">{}{version}</div>", esc(&run.dir));
    h.push_str("<div class=\"totals\">\n");
    let tiles = [
        ("records", count_text(records)),
        ("kept", count_text(kept)),
        ("rejected", count_text(rejected)),
        ("kept ratio", ratio),
        ("pairs / hour", count_text(st.pairs_per_hour)),
        ("device", device),
        ("wall time", duration_text(st.seconds)),
        // Summed over the shards: more than the wall time when processes worked side by side.
        ("work time", duration_text(st.work_seconds)),
        ("shards", shards),
    ];
    for (label, value) in tiles {
        let _ = writeln!(
            h,
            "<div class=\"tot\"><b>{}</b><span>{label}</span></div>",
            esc(&value)
        );
    }
    h.push_str("</div>\n");
    if let (Some(done), Some(all)) = (st.shards_finished, st.shards_expected) {
        if done < all {
            let _ = writeln!(
                h,
                "<div class=\"warn\"><b>Partial: {} of {} shards finished.</b> The numbers below \
                 cover the finished shards only (a run in progress or stopped: rerun it; one \
                 process of several: merge when all are done).</div>",
                count_text(done as f64),
                count_text(all as f64)
            );
        }
    }
    if records != run.records.len() as f64 {
        let _ = writeln!(
            h,
            "<div class=\"warn\">index.jsonl lists {} records; stats.json counts {} (a job still running, or an unmerged folder).</div>",
            run.records.len(),
            count_text(records)
        );
    }
    let missing = run.missing_shards();
    if !missing.is_empty() {
        let names: Vec<String> = missing.iter().map(|m| esc(m)).collect();
        let _ = writeln!(
            h,
            "<div class=\"warn\"><b>{} missing shard{}:</b> {} — named by index.jsonl or a shard stats file, but not in the folder; their records are shown without pictures.</div>",
            missing.len(),
            if missing.len() == 1 { "" } else { "s" },
            names.join(", ")
        );
    }
}

pub(super) fn render_histograms(h: &mut String, run: &Run) {
    h.push_str("<h2>Scores</h2>\n<div class=\"row\">\n");
    for (key, label) in SCORES {
        let values: Vec<f64> = run.records.iter().filter_map(|r| score(r, key)).collect();
        h.push_str(&histogram_svg(label, &values, run.threshold(key)));
    }
    h.push_str(
        "</div>\n<p class=\"note\">All scored records in index.jsonl, kept and rejected. \
        Raw cosines; bars below the threshold are grey.</p>\n",
    );
}

/// A histogram of `values` as inline SVG, with the threshold as a dashed vertical line.
pub(super) fn histogram_svg(label: &str, values: &[f64], threshold: Option<f64>) -> String {
    let (w, ht) = (380.0, 190.0);
    let (left, right, top, bottom) = (34.0, 12.0, 36.0, 30.0);
    let (pw, ph) = (w - left - right, ht - top - bottom);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<figure><svg width=\"{w}\" height=\"{ht}\" viewBox=\"0 0 {w} {ht}\" role=\"img\" aria-label=\"{label} histogram\">"
    );
    let _ = writeln!(
        s,
        "<text x=\"{left}\" y=\"14\" font-size=\"13\" font-weight=\"bold\">{label}</text>"
    );
    if values.is_empty() {
        let _ = writeln!(s, "<text x=\"{left}\" y=\"{}\" font-size=\"12\" fill=\"#5b6670\">no scored records</text>", top + ph / 2.0);
    } else {
        let (lo, hi) = histogram_range(values, threshold);
        let mut bins = [0usize; HIST_BINS];
        for &v in values {
            let b = ((v - lo) / (hi - lo) * HIST_BINS as f64).floor();
            bins[(b.max(0.0) as usize).min(HIST_BINS - 1)] += 1;
        }
        let max = *bins.iter().max().unwrap_or(&1) as f64;
        let bw = pw / HIST_BINS as f64;
        let x_of = |v: f64| left + (v - lo) / (hi - lo) * pw;
        for (i, &n) in bins.iter().enumerate().filter(|(_, n)| **n > 0) {
            let centre = lo + (i as f64 + 0.5) / HIST_BINS as f64 * (hi - lo);
            let fill = match threshold {
                Some(t) if centre < t => BAR_FAIL,
                _ => BAR_PASS,
            };
            let bh = (n as f64 / max * ph).max(1.0);
            let _ = writeln!(
                s,
                "<rect class=\"bar\" x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{fill}\"><title>{n}</title></rect>",
                left + i as f64 * bw + 0.5,
                top + ph - bh,
                (bw - 1.0).max(0.5),
                bh
            );
        }
        let base = top + ph;
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" y1=\"{base}\" x2=\"{}\" y2=\"{base}\" stroke=\"#5b6670\"/>",
            left + pw
        );
        let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" font-size=\"10\" text-anchor=\"end\" fill=\"#5b6670\">{max}</text>", left - 4.0, top + 8.0);
        for v in [lo, (lo + hi) / 2.0, hi] {
            let _ = writeln!(s, "<text x=\"{:.1}\" y=\"{}\" font-size=\"10\" text-anchor=\"middle\" fill=\"#5b6670\">{v:.2}</text>", x_of(v), base + 13.0);
        }
        if let Some(t) = threshold {
            let x = x_of(t);
            let _ = writeln!(
                s,
                "<line class=\"threshold\" data-threshold=\"{t:.3}\" x1=\"{x:.1}\" y1=\"{}\" x2=\"{x:.1}\" y2=\"{base}\" stroke=\"{THRESHOLD_STROKE}\" stroke-width=\"2\" stroke-dasharray=\"5 3\"/>",
                top - 4.0
            );
            // The label sits above the bars, between the title line and the plot.
            let anchor = if x > left + pw * 0.7 { "end" } else { "start" };
            let dx = if anchor == "end" { -4.0 } else { 4.0 };
            let _ = writeln!(s, "<text x=\"{:.1}\" y=\"{}\" font-size=\"10.5\" text-anchor=\"{anchor}\" fill=\"{THRESHOLD_STROKE}\">threshold {t:.3}</text>", x + dx, top - 8.0);
        }
    }
    s.push_str("</svg>");
    let below = threshold.map(|t| values.iter().filter(|&&v| v < t).count());
    let caption = match below {
        Some(b) => format!("{} scored · {} below the threshold", values.len(), b),
        None => format!("{} scored · no threshold in stats.json", values.len()),
    };
    let _ = writeln!(s, "<figcaption>{caption}</figcaption></figure>");
    s
}

/// The x range: the values and the threshold, padded a little; never empty.
pub(super) fn histogram_range(values: &[f64], threshold: Option<f64>) -> (f64, f64) {
    let mut lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let mut hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if let Some(t) = threshold.filter(|t| t.is_finite()) {
        lo = lo.min(t);
        hi = hi.max(t);
    }
    let pad = ((hi - lo) * 0.04).max(0.02);
    (lo - pad, hi + pad)
}

pub(super) fn render_tables(h: &mut String, run: &Run) {
    h.push_str("<h2>Rejections and skipped subjects</h2>\n<div class=\"row\">\n");
    let rejections = ordered_counts(&run.stats.rejections, &["dino", "clip_i", "clip_t"]);
    let total: f64 = rejections.iter().map(|(_, n)| n).sum();
    h.push_str("<table><tr><th>rejected by</th><th>records</th><th>share</th></tr>\n");
    for (reason, n) in &rejections {
        let share = if total > 0.0 {
            format!("{:.1}%", 100.0 * n / total)
        } else {
            "—".into()
        };
        let name = SCORES
            .iter()
            .find(|(k, _)| k == reason)
            .map(|(_, l)| l.to_string())
            .unwrap_or_else(|| reason.clone());
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{share}</td></tr>",
            esc(&name),
            count_text(*n)
        );
    }
    h.push_str("</table>\n");
    h.push_str("<table><tr><th>skipped</th><th>count</th></tr>\n");
    for (why, n) in ordered_counts(&run.stats.skipped_subjects, &["unreadable", "mask_size"]) {
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td></tr>",
            esc(&format!("subjects: {}", why.replace('_', " "))),
            count_text(n)
        );
    }
    let _ = writeln!(
        h,
        "<tr><td>records: skipped</td><td>{}</td></tr>",
        count_text(run.stats.skipped_records as f64)
    );
    h.push_str("</table>\n");
    render_taxonomy(h, run);
    h.push_str("</div>\n");
}

/// Counts in `first` order, then any other keys in order.
pub(super) fn ordered_counts(map: &BTreeMap<String, usize>, first: &[&str]) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = first
        .iter()
        .map(|k| (k.to_string(), map.get(*k).copied().unwrap_or(0) as f64))
        .collect();
    for (k, v) in map.iter().filter(|(k, _)| !first.contains(&k.as_str())) {
        out.push((k.clone(), *v as f64));
    }
    out
}

pub(super) fn render_taxonomy(h: &mut String, run: &Run) {
    let mut rows: BTreeMap<String, [usize; 3]> = BTreeMap::new();
    for r in &run.records {
        let row = rows
            .entry(match r.taxonomy.as_str() {
                "" => "—".to_string(),
                t => t.to_string(),
            })
            .or_default();
        row[0] += 1;
        row[1] += r.kept as usize;
        row[2] += (r.kept && r.edit) as usize;
    }
    h.push_str("<table><tr><th>taxonomy</th><th>records</th><th>kept</th><th>kept %</th><th>kept with edit pair</th></tr>\n");
    for (taxonomy, [n, kept, edit]) in rows {
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{n}</td><td>{kept}</td><td>{:.1}%</td><td>{edit}</td></tr>",
            esc(&taxonomy),
            100.0 * kept as f64 / n.max(1) as f64
        );
    }
    h.push_str("</table>\n");
}

pub(super) fn render_stages(h: &mut String, run: &Run) {
    h.push_str("<h2>Time per stage</h2>\n");
    let stages: Vec<(&str, f64)> = run
        .stats
        .stage_seconds
        .named()
        .into_iter()
        .filter(|(_, s)| s.is_finite() && *s > 0.0)
        .collect();
    let total: f64 = stages.iter().map(|(_, s)| s).sum();
    if total <= 0.0 {
        h.push_str("<p class=\"note\">No stage timings in stats.json.</p>\n");
        return;
    }
    let (w, ht) = (900.0, 30.0);
    let _ = writeln!(h, "<svg width=\"{w}\" height=\"{ht}\" viewBox=\"0 0 {w} {ht}\" role=\"img\" aria-label=\"time per stage\">");
    let mut x = 0.0;
    let mut legend = String::new();
    for (i, (stage, secs)) in stages.iter().enumerate() {
        let colour = STAGE_COLOURS[i % STAGE_COLOURS.len()];
        let share = secs / total;
        let sw = share * w;
        let name = esc(stage);
        let _ = writeln!(h, "<rect class=\"stage\" x=\"{x:.1}\" y=\"0\" width=\"{sw:.1}\" height=\"{ht}\" fill=\"{colour}\"><title>{name}: {:.1}%</title></rect>", share * 100.0);
        if sw > 70.0 {
            let _ = writeln!(
                h,
                "<text x=\"{:.1}\" y=\"19\" font-size=\"12\" fill=\"#fff\">{name} {:.0}%</text>",
                x + 6.0,
                share * 100.0
            );
        }
        let _ = write!(legend, "<span><span class=\"sw\" style=\"background:{colour}\"></span>{name} {:.1}% ({})</span>", share * 100.0, duration_text(*secs));
        x += sw;
    }
    h.push_str("</svg>\n");
    let _ = writeln!(h, "<div class=\"legend\">{legend}</div>");
    let _ = writeln!(
        h,
        "<p class=\"note\">Shares of the summed stage time ({}).</p>",
        duration_text(total)
    );
}

pub(super) fn render_sheet(
    h: &mut String,
    run: &Run,
    title: &str,
    records: &[&IndexLine],
    thumbs: &HashMap<String, Thumbs>,
    missing: &HashSet<String>,
) {
    let _ = writeln!(h, "<h2>{}</h2>", esc(title));
    if records.is_empty() {
        h.push_str("<p class=\"note\">None.</p>\n");
        return;
    }
    if records.iter().all(|r| shard_of(r).is_none()) {
        h.push_str("<p class=\"note\">Their images were not written (run with --keep-rejected to keep them in the shards).</p>\n");
    }
    h.push_str("<div class=\"sheet\">\n");
    for r in records {
        let class = if r.kept { "card" } else { "card rej" };
        let _ = writeln!(h, "<div class=\"{class}\">");
        render_strip(h, r, thumbs.get(&r.key), missing);
        let _ = writeln!(h, "<div class=\"prompt\">{}</div>", esc(&r.prompt));
        render_scores(h, run, r);
        let meta = [
            format!("key {}", r.key),
            format!("subject {}", r.subject),
            r.taxonomy.clone(),
            format!("template {}", r.template),
            format!("seed {}", r.seed),
        ];
        let _ = writeln!(h, "<div class=\"meta\">{}</div>", esc(&meta.join(" · ")));
        h.push_str("</div>\n");
    }
    h.push_str("</div>\n");
}

pub(super) fn render_strip(
    h: &mut String,
    r: &IndexLine,
    thumbs: Option<&Thumbs>,
    missing: &HashSet<String>,
) {
    let Some(shard) = shard_of(r) else {
        return; // not written: the sheet says so once, above the cards
    };
    h.push_str("<div class=\"strip\">");
    let why_none = match missing.contains(shard) {
        true => "shard missing",
        false => "not in shard",
    };
    for role in Role::ALL {
        let thumb = thumbs.and_then(|t| t.get(&role));
        if role == Role::Source && thumb.is_none() {
            continue;
        }
        let label = role.label();
        match thumb {
            Some(t) => {
                let _ = write!(
                    h,
                    "<figure><img class=\"t\" alt=\"{label}\" title=\"{label} {}×{}\" src=\"{}\"><figcaption>{label}</figcaption></figure>",
                    t.width, t.height, t.uri
                );
            }
            None => {
                let _ = write!(h, "<figure><div class=\"none\">{why_none}</div><figcaption>{label}</figcaption></figure>");
            }
        }
    }
    h.push_str("</div>\n");
}

pub(super) fn render_scores(h: &mut String, run: &Run, r: &IndexLine) {
    let mut parts = Vec::new();
    for (key, label) in SCORES {
        let text = match score(r, key) {
            Some(v) => {
                let fails = run.threshold(key).is_some_and(|t| v < t);
                let class = if fails { " class=\"fail\"" } else { "" };
                format!("{label} <span{class}>{v:.3}</span>")
            }
            None => format!("{label} —"),
        };
        parts.push(text);
    }
    if let Some(reason) = Some(&r.reason).filter(|s| !r.kept && !s.is_empty()) {
        parts.push(format!("rejected by <b>{}</b>", esc(reason)));
    }
    let _ = writeln!(h, "<div class=\"meta\">{}</div>", parts.join(" · "));
}

pub(super) fn render_shards(h: &mut String, run: &Run) {
    h.push_str("<h2>Shards</h2>\n");
    if run.shards.is_empty() {
        h.push_str("<p class=\"note\">No shards yet.</p>\n");
        return;
    }
    h.push_str("<table><tr><th>shard</th><th>size</th><th>records</th><th>kept</th><th>in index.jsonl</th></tr>\n");
    for (name, shard) in run.shards.iter().take(MAX_SHARD_ROWS) {
        let stat = |k: fn(&Stats) -> usize| {
            shard
                .stats
                .as_ref()
                .map_or_else(|| "—".into(), |s| count_text(k(s) as f64))
        };
        let (class, size) = match shard.bytes {
            Some(b) => ("", bytes_text(b)),
            None if shard.indexed == 0 && shard.stats.is_some() => {
                ("", "no tar (no record written)".into())
            }
            None => (" class=\"missing\"", "missing".into()),
        };
        let _ = writeln!(
            h,
            "<tr{class}><td>{}</td><td>{size}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(name),
            stat(|s| s.records),
            stat(|s| s.kept),
            shard.indexed
        );
    }
    h.push_str("</table>\n");
    if run.shards.len() > MAX_SHARD_ROWS {
        let _ = writeln!(
            h,
            "<p class=\"note\">… and {} more shards.</p>",
            run.shards.len() - MAX_SHARD_ROWS
        );
    }
    let unfinished: BTreeSet<&String> = run
        .shards
        .iter()
        .filter(|(_, s)| s.stats.is_none() && s.bytes.is_some())
        .map(|(n, _)| n)
        .collect();
    if !unfinished.is_empty() {
        let _ = writeln!(
            h,
            "<p class=\"note\">{} shard(s) without a .stats.json (not yet finished).</p>",
            unfinished.len()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Text

/// Escapes text for HTML element content and quoted attribute values.
pub(super) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A count with thousands separators (rounded).
pub(super) fn count_text(n: f64) -> String {
    if !n.is_finite() {
        return "—".into();
    }
    let digits = format!("{:.0}", n.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < -0.5 {
        out.insert(0, '-');
    }
    out
}

pub(super) fn bytes_text(b: u64) -> String {
    match b as f64 {
        b if b < 1e3 => format!("{b} B"),
        b if b < 1e6 => format!("{:.1} kB", b / 1e3),
        b if b < 1e9 => format!("{:.1} MB", b / 1e6),
        b => format!("{:.2} GB", b / 1e9),
    }
}

pub(super) fn duration_text(secs: f64) -> String {
    match secs {
        s if !s.is_finite() => "—".into(),
        s if s < 120.0 => format!("{s:.1} s"),
        s if s < 7200.0 => format!("{:.1} min", s / 60.0),
        s => format!("{:.2} h", s / 3600.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            esc("<script>a&b</script>\"'"),
            "&lt;script&gt;a&amp;b&lt;/script&gt;&quot;&#39;"
        );
    }

    #[test]
    fn counts_and_durations_read_well() {
        assert_eq!(count_text(1234567.0), "1,234,567");
        assert_eq!(count_text(999.4), "999");
        assert_eq!(duration_text(90.0), "90.0 s");
        assert_eq!(duration_text(7200.0), "2.00 h");
    }
}
