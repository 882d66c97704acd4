#!/usr/bin/env python3
"""tools/compare's bookkeeping (numpy + safetensors only; no torch, no diffusers):

  report.py check --check NAME --ref ref_fp32.safetensors --got toffee.safetensors
                  [--fp16 diffusers_fp16.safetensors] [--threshold 1e-2]
      relative L2 (||got - ref|| / ||ref||, float64) of every tensor in --ref; prints one JSON
      line {"kind": "forward-check", ...}; exit 0 if all are below the threshold, 1 if not.
  report.py tag --kind KIND --config NAME [--model KEY] (--json TEXT | --error TEXT)
      one JSON line {"kind": KIND, "config": NAME, ...the object in TEXT} (or with "error").
  report.py fill RAW.jsonl --model KEY --configs A,B --modes eager,graph --reason TEXT
      appends placeholder anchor lines ("skipped": TEXT) for the pairs that have no real line yet.
  report.py checks-tsv RAW.jsonl
      the correctness sets anchor.py saved (tab-separated, for run.sh).
  report.py table RAW.jsonl
      the markdown table of results.md from the JSON lines of anchor.py, toffee bench and the
      forward checks (malformed lines are skipped with a note on stderr).
"""

import argparse
import json
import math
import sys

def rel_l2(got, ref):
    import numpy as np
    g = np.asarray(got, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    if g.shape != r.shape:
        raise ValueError(f"shape {list(g.shape)} vs reference {list(r.shape)}")
    den = float(np.linalg.norm(r.ravel()))
    return float(np.linalg.norm((g - r).ravel()) / max(den, 1e-30))


def cmd_check(a):
    from safetensors.numpy import load_file
    ref = load_file(a.ref)
    rec = {"kind": "forward-check", "check": a.check, "threshold": a.threshold}
    try:
        got = load_file(a.got)
    except Exception as e:
        rec.update(ok=False, error=f"reading {a.got}: {e!r}")
        print(json.dumps(rec), flush=True)
        return 1
    fp16 = load_file(a.fp16) if a.fp16 else {}
    rels, errs, base = {}, {}, {}
    for k, r in ref.items():
        if k not in got:
            errs[k] = "missing from toffee's output"
            continue
        try:
            rels[k] = rel_l2(got[k], r)
            if not math.isfinite(rels[k]):
                errs[k] = "non-finite"
        except ValueError as e:
            errs[k] = str(e)
        if k in fp16:
            base[k] = rel_l2(fp16[k], r)
    worst = max(rels.values()) if rels else None
    ok = not errs and bool(rels) and worst < a.threshold
    rec.update(ok=ok, rel_l2=rels, max_rel_l2=worst, diffusers_fp16_rel_l2=base)
    if errs:
        rec["errors"] = errs
    print(json.dumps(rec), flush=True)
    return 0 if ok else 1


def cmd_tag(a):
    # forward-check lines are keyed by the check's name, the others by the configuration's
    key = "check" if a.kind == "forward-check" else "config"
    rec = {"kind": a.kind, key: a.config}
    if a.error is None:
        try:
            obj = json.loads(a.json)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
            if "config" in obj:  # toffee bench's own name for it (sd15, a folder)
                obj["source_config"] = obj.pop("config")
            obj.pop("kind", None)
            obj.pop(key, None)
            rec.update(obj)
        except ValueError as e:
            rec["error"] = f"unparsable output ({e}): {a.json[:500]!r}"
    else:
        rec["error"] = a.error
        if a.kind == "forward-check":
            rec["ok"] = False
    if a.model:
        rec["model"] = a.model
    print(json.dumps(rec), flush=True)
    return 0


def load_lines(path):
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
                if isinstance(obj, dict):
                    out.append(obj)
            except ValueError:
                print(f"{path}:{n}: skipped a malformed line", file=sys.stderr)
    return out


def fmt_rate(rec):
    if rec is None or rec.get("placeholder"):
        return "not run"
    if "skipped" in rec:
        return "skipped"
    if "error" in rec:
        return "failed"
    v = rec.get("calls_per_s")
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        return "failed"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def rate(rec):
    if rec and "error" not in rec and "skipped" not in rec and isinstance(rec.get("calls_per_s"), (int, float)):
        return float(rec["calls_per_s"])
    return None


def cmd_table(a):
    lines = load_lines(a.raw)
    anchors, toffee, checks, fchecks, order = {}, {}, {}, {}, []
    for r in lines:
        k = r.get("kind")
        if k == "anchor" and r.get("config"):
            anchors[(r["config"], r.get("mode"))] = r  # the last line of a (config, mode) wins
            if r["config"] not in order:
                order.append(r["config"])
        elif k == "toffee" and r.get("config"):
            toffee[r["config"]] = r
            if r["config"] not in order:
                order.append(r["config"])
        elif k == "check" and r.get("check"):
            checks[r["check"]] = r
        elif k == "forward-check" and r.get("check"):
            fchecks[r["check"]] = r
    model_of = {}
    for (cfg, _), r in anchors.items():
        if r.get("model"):
            model_of[cfg] = r["model"]
    for cfg, r in toffee.items():
        model_of.setdefault(cfg, r.get("model"))
    out = []
    out.append("| config | batch | diffusers eager | + graph | compile | toffee | toffee / best diffusers | rel L2 |")
    out.append("|---|---|---|---|---|---|---|---|")
    for cfg in order:
        e, g, c = anchors.get((cfg, "eager")), anchors.get((cfg, "graph")), anchors.get((cfg, "compile"))
        t = toffee.get(cfg)
        batch = next((r.get("batch") for r in (e, g, c, t) if r and r.get("batch") is not None), "")
        best = max([x for x in (rate(e), rate(g), rate(c)) if x is not None], default=None)
        tr = rate(t)
        ratio = f"{tr / best:.2f}" if (tr is not None and best) else "—"
        fc = fchecks.get(model_of.get(cfg))
        if fc is None:
            rl = "not run" if model_of.get(cfg) not in checks else "not compared"
        elif "max_rel_l2" in fc and isinstance(fc["max_rel_l2"], float) and math.isfinite(fc["max_rel_l2"]):
            rl = f"{fc['max_rel_l2']:.1e} {'ok' if fc.get('ok') else 'FAIL'}"
        elif "not started" in str(fc.get("error", "")):
            rl = "not run"
        elif "error" in fc or "errors" in fc:
            rl = "error"
        else:
            rl = "FAIL"
        out.append(f"| {cfg} | {batch} | {fmt_rate(e)} | {fmt_rate(g)} | {fmt_rate(c)} | {fmt_rate(t)} | {ratio} | {rl} |")
    out.append("")
    out.append("calls/s (one model call on the whole batch), fp16, random weights; ratio = toffee / the best "
               "of the three diffusers columns (> 1: toffee is faster); rel L2 = the worst output tensor of "
               "`toffee forward` against diffusers in fp32 on the same fp16 weights and inputs "
               "(the check's own batch, see below), ok below the threshold.")
    notes = []
    grouped = {}  # the same note for several configs: one line
    for (cfg, mode), r in anchors.items():
        if "error" in r:
            key = (mode, "failed", r["error"][:300])
        elif "skipped" in r:
            key = (mode, "not run" if r.get("placeholder") else "skipped", r["skipped"])
        elif mode == "compile" and "compile_s" in r:
            fg = "" if r.get("fullgraph", True) else f", fullgraph=False after: {r.get('fullgraph_error', '')[:200]}"
            notes.append(f"- diffusers {cfg} compile ({r.get('compile_mode')}): first call {r['compile_s']} s{fg}")
            continue
        else:
            continue
        grouped.setdefault(key, []).append(cfg)
    for (mode, what, why), cfgs in grouped.items():
        notes.append(f"- diffusers {mode} {what} for {', '.join(cfgs)}: {why}")
    for cfg, r in toffee.items():
        if "error" in r:
            notes.append(f"- toffee {cfg}: failed: {r['error'][:300]}")
    for name, r in checks.items():
        if "error" in r:
            notes.append(f"- check {name}: diffusers side failed: {r['error'][:300]}")
        else:
            base = ", ".join(f"{k} {v:.1e}" for k, v in r.get("diffusers_fp16_vs_fp32_rel_l2", {}).items())
            notes.append(f"- check {name} ({r.get('component')}, batch {r.get('batch')}, {r.get('resolution')} px): "
                         f"diffusers fp16 vs fp32 rel L2 {base}")
    for name, r in fchecks.items():
        if "error" in r or "errors" in r:
            notes.append(f"- check {name}: toffee side: {r.get('error') or r.get('errors')}")
        else:
            per = ", ".join(f"{k} {v:.1e}" for k, v in r.get("rel_l2", {}).items())
            notes.append(f"- check {name}: toffee vs fp32 rel L2 {per} ({'ok' if r.get('ok') else 'FAIL'}, "
                         f"threshold {r.get('threshold')})")
    cv = [r for r in lines if r.get("kind") == "config-verify"]
    if cv:
        r = cv[-1]
        if r.get("ok") is False:
            notes.append("- CONFIG MISMATCH between anchor.py and src/configs.rs: " + "; ".join(r.get("diffs", [])))
        elif r.get("ok") is None:
            notes.append(f"- configs vs src/configs.rs: {r.get('note')}")
        else:
            notes.append("- anchor.py's configurations equal src/configs.rs's")
    env = [r for r in lines if r.get("kind") == "env"]
    if env:
        r = env[-1]
        notes.insert(0, f"- diffusers side: {r.get('device')}, torch {r.get('torch')}, diffusers "
                        f"{r.get('diffusers')}, transformers {r.get('transformers')}, {r.get('dtype')}")
    if notes:
        out.append("")
        out.extend(notes)
    print("\n".join(out))
    return 0


def cmd_fill(a):
    """Placeholder anchor lines for (config, mode) pairs that have no real line yet: appended to RAW."""
    latest = {}
    for r in load_lines(a.raw):
        if r.get("kind") == "anchor" and r.get("config"):
            latest[(r["config"], r.get("mode"))] = r
    with open(a.raw, "a", encoding="utf-8") as f:
        for c in [x for x in a.configs.split(",") if x]:
            for m in [x for x in a.modes.split(",") if x]:
                r = latest.get((c, m))
                if r is None or r.get("placeholder"):
                    f.write(json.dumps({"kind": "anchor", "config": c, "model": a.model, "mode": m,
                                        "skipped": a.reason, "placeholder": True}) + "\n")
    return 0


def cmd_checks_tsv(a):
    """The saved correctness sets, one tab-separated line each: check, component, model dir, inputs,
    reference, diffusers fp16 output. The largest model (SDXL) goes last."""
    checks = {}
    for r in load_lines(a.raw):
        if r.get("kind") == "check" and r.get("check") and "error" not in r:
            checks[r["check"]] = r
    last = ["sdxl-unet"]
    for name in sorted(checks, key=lambda n: (n in last, list(checks).index(n))):
        r = checks[name]
        print("\t".join([name, r["component"], r["model"], r["inputs"], r["ref"], r["diffusers_fp16"]]))
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check")
    c.add_argument("--check", required=True)
    c.add_argument("--ref", required=True)
    c.add_argument("--got", required=True)
    c.add_argument("--fp16")
    c.add_argument("--threshold", type=float, default=1e-2)
    t = sub.add_parser("tag")
    t.add_argument("--kind", required=True)
    t.add_argument("--config", required=True)
    t.add_argument("--model", help="anchor.py's model key (which check covers it)")
    g = t.add_mutually_exclusive_group(required=True)
    g.add_argument("--json")
    g.add_argument("--error")
    tb = sub.add_parser("table")
    tb.add_argument("raw")
    fl = sub.add_parser("fill")
    fl.add_argument("raw")
    fl.add_argument("--model", required=True)
    fl.add_argument("--configs", required=True)
    fl.add_argument("--modes", required=True)
    fl.add_argument("--reason", required=True)
    ct = sub.add_parser("checks-tsv")
    ct.add_argument("raw")
    a = ap.parse_args()
    return {"check": cmd_check, "tag": cmd_tag, "table": cmd_table, "checks-tsv": cmd_checks_tsv,
            "fill": cmd_fill}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
