#!/usr/bin/env python3
"""Checks that a `toffee pairs --out DIR` folder loads with the loaders people train from.

    python tools/loaders/check_dataset.py DIR

Checks (one PASS/FAIL line each, then the problems found, each naming file, key and field):

  layout        job.json / index.jsonl / stats.json / per-shard files present and agreeing
  webdataset    webdataset.WebDataset over every shard (and each shard alone): one member set
                for every sample, PNGs decode with PIL (masks 'L', images 'RGB', expected sizes),
                KEY.json parses and names its KEY
  hf-datasets   datasets.load_dataset("webdataset") over all shards, and over each shard alone:
                loads, iterates every row, one feature schema, no null-typed features; and
                datasets.load_dataset(DIR), the folder read through its dataset card (README.md)
  pyarrow-json  pyarrow.json.read_json of index.jsonl and of every pairs-*.jsonl: seed is int64
                with exact values, no null-typed column, one schema across files
  index-types   index.jsonl: same keys in every record, one JSON type per field (null counts as a
                type of its own), unique keys, integer seeds in [0, 2**53)
  json-vs-index KEY.json and the index line of the same key agree on every shared field
                (floats compared as printed), and KEY.json fields have one JSON type across records
  f32-widening  no float written as a widened f32 (0.800000011920929 for 0.8) in KEY.json,
                index.jsonl, job.json or stats.json
  config-names  job.json's config and the records' `settings` agree, and the config's concepts
                have the same names in the records (view.elevations ↔ view.<elevation>)

Exit status 0 when every check passes, 1 when one fails, 2 on a usage error.
"""

import argparse
import glob
import io
import json
import logging
import os
import sys
import tarfile
import tempfile
import time
import traceback
import warnings

MEMBERS = (
    "subject.png",
    "subject_mask.png",
    "target.png",
    "target_mask.png",
    "source.png",
    "edit_mask.png",
    "json",
)
MASKS = {"subject_mask.png", "target_mask.png", "edit_mask.png"}
# Members whose size is the job's resolution (the subject keeps its own size, its mask matches it).
AT_RESOLUTION = {"target.png", "target_mask.png", "source.png", "edit_mask.png"}
MAX_PROBLEMS = 25  # printed per check; the rest are counted


class Problems(list):
    """The problems one check found (strings); `notes` are printed but do not fail it."""

    def __init__(self, *a):
        super().__init__(*a)
        self.notes = []


# ---------------------------------------------------------------------------------------------
# Small helpers


def jtype(v):
    """The JSON type of a parsed value; null is a type of its own."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object"


def walk(v, path=""):
    """(path, value) for every leaf of a parsed JSON value (arrays are leaves; their items are
    walked as path[])."""
    if isinstance(v, dict):
        for k, x in v.items():
            yield from walk(x, f"{path}.{k}" if path else k)
    else:
        yield path, v
        if isinstance(v, list):
            for x in v:
                if isinstance(x, (dict, list)):
                    yield from walk(x, path + "[]")
                else:
                    yield path + "[]", x


def nodes(v, path=""):
    """(path, value) for every node of a parsed JSON value, objects and arrays included, so that
    a field that is an object in one record and null in another shows both types."""
    yield path, v
    if isinstance(v, dict):
        for k, x in v.items():
            yield from nodes(x, f"{path}.{k}" if path else k)
    elif isinstance(v, list):
        for x in v:
            yield from nodes(x, path + "[]")


def printed(v):
    """A value as it prints, so 0.8 and 0.800000011920929 differ and 1 and 1.0 do too."""
    return json.dumps(v, sort_keys=True)


def widened_f32(x):
    """The f32 that `x` is a widened copy of, as it should print, else None: x is exactly an f32
    and that f32's shortest repr is shorter than x's (0.800000011920929 -> '0.8')."""
    import numpy as np

    if not isinstance(x, float) or x != x or x in (float("inf"), float("-inf")):
        return None
    f = np.float32(x)
    if float(f) != x:
        return None
    short = repr(float(str(f)))  # numpy prints the shortest repr that round-trips the f32
    if short != repr(x) and len(short) < len(repr(x)):
        return short
    return None


def summarize(items, n=3):
    items = list(items)
    s = ", ".join(str(i) for i in items[:n])
    return s + (f", … ({len(items)} in all)" if len(items) > n else "")


def read_jsonl(path, problems):
    """Parsed lines of a JSON-lines file; bad lines are problems."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                problems.append(f"{os.path.basename(path)}:{n}: not JSON: {e}")
    return out


def tar_records(path):
    """{key: {member: bytes}} of a shard, in tar order (WebDataset's rule: KEY is the name up to
    the first dot of the base name)."""
    recs = {}
    with tarfile.open(path) as t:
        for m in t.getmembers():
            if not m.isfile():
                continue
            base = os.path.basename(m.name)
            key, _, member = base.partition(".")
            recs.setdefault(key, {})[member] = t.extractfile(m).read()
    return recs


# ---------------------------------------------------------------------------------------------
# The run folder, read once


class Run:
    def __init__(self, d):
        self.dir = d
        self.setup = Problems()
        self.job = json.load(open(os.path.join(d, "job.json")))
        self.config = self.job.get("config", {})
        self.resolution = self.config.get("job", {}).get("resolution")
        self.index = read_jsonl(os.path.join(d, "index.jsonl"), self.setup)
        self.by_key = {}
        for r in self.index:
            self.by_key.setdefault(r.get("key"), r)
        nshards = self.job.get("shards")
        if isinstance(nshards, int):
            self.tars = [os.path.join(d, f"pairs-{i:06d}.tar") for i in range(nshards)]
        else:
            self.tars = sorted(glob.glob(os.path.join(d, "pairs-*.tar")))
        self.shard_jsonl = [t[: -len(".tar")] + ".jsonl" for t in self.tars]
        # KEY.json of every record in the tars: {(tar name, key): parsed}
        self.records = {}
        self.members = {}
        for t in self.tars:
            if not os.path.isfile(t):
                continue
            for key, mem in tar_records(t).items():
                name = os.path.basename(t)
                self.members[(name, key)] = mem
                if "json" in mem:
                    try:
                        self.records[(name, key)] = json.loads(mem["json"])
                    except json.JSONDecodeError as e:
                        self.setup.append(f"{name}: {key}.json: not JSON: {e}")


# ---------------------------------------------------------------------------------------------
# The checks: each returns Problems (empty: PASS)


def check_layout(run):
    p = Problems(run.setup)
    d = run.dir
    for f in ("job.json", "index.jsonl", "stats.json"):
        if not os.path.isfile(os.path.join(d, f)):
            p.append(f"{f}: missing")
    for t, j in zip(run.tars, run.shard_jsonl):
        for f in (j, t[: -len(".tar")] + ".stats.json"):
            if not os.path.isfile(f):
                p.append(f"{os.path.basename(f)}: missing")
        # A shard that wrote no record has no tar (an empty tar breaks the loaders).
        placed = os.path.isfile(j) and any(r.get("shard") for r in read_jsonl(j, p))
        if placed and not os.path.isfile(t):
            p.append(f"{os.path.basename(t)}: missing")
        if not placed and os.path.isfile(t):
            p.append(f"{os.path.basename(t)}: exists but no index line places a record in it")
    # index.jsonl is the per-shard index lines, in shard order
    lines = []
    for j in run.shard_jsonl:
        if os.path.isfile(j):
            lines += read_jsonl(j, p)
    if lines != run.index:
        p.append(
            f"index.jsonl: {len(run.index)} records, not the {len(lines)} lines of the "
            "pairs-*.jsonl files in shard order"
        )
    if run.job.get("records") is not None and run.job["records"] != len(run.index):
        p.append(f"job.json: records = {run.job['records']} but index.jsonl has {len(run.index)}")
    stats = json.load(open(os.path.join(d, "stats.json")))
    kept = sum(1 for r in run.index if r.get("kept") is True)
    for field, want in (("records", len(run.index)), ("kept", kept), ("rejected", len(run.index) - kept)):
        if stats.get(field) != want:
            p.append(f"stats.json: {field} = {stats.get(field)!r} but index.jsonl says {want}")
    # which index records should be in which tar
    in_tars = {k for (_, k) in run.members}
    for r in run.index:
        key, shard = r.get("key"), r.get("shard")
        should = r.get("kept") is True or run.job.get("keep_rejected") is True
        if should and (shard, key) not in run.members:
            p.append(f"index.jsonl: {key}: shard = {shard!r} but no {key}.* member is in it")
        if not should and key in in_tars:
            p.append(f"index.jsonl: {key}: rejected without --keep-rejected, yet in a tar")
    for (name, key) in run.members:
        r = run.by_key.get(key)
        if r is None:
            p.append(f"{name}: {key}: in the tar but not in index.jsonl")
        elif r.get("shard") != name:
            p.append(f"{name}: {key}: index.jsonl says shard = {r.get('shard')!r}")
    return p


def check_webdataset(run):
    import webdataset as wds
    from PIL import Image

    p = Problems()
    urls = [t for t in run.tars if os.path.isfile(t)]
    seen = {}
    member_sets = {}
    n = 0
    for s in wds.WebDataset(urls, shardshuffle=False):
        n += 1
        name, key = os.path.basename(s["__url__"]), s["__key__"]
        members = frozenset(k for k in s if not k.startswith("__"))
        member_sets.setdefault(members, []).append((name, key))
        seen[(name, key)] = True
        sizes = {}
        for m in sorted(members):
            if not m.endswith(".png"):
                continue
            try:
                im = Image.open(io.BytesIO(s[m]))
                im.load()
            except Exception as e:
                p.append(f"{name}: {key}.{m}: PIL cannot decode it: {e}")
                continue
            want = "L" if m in MASKS else "RGB"
            if im.mode != want:
                p.append(f"{name}: {key}.{m}: mode {im.mode!r}, expected {want!r}")
            sizes[m] = im.size
            if m in AT_RESOLUTION and run.resolution and im.size != (run.resolution, run.resolution):
                p.append(
                    f"{name}: {key}.{m}: size {im.size}, expected the job's resolution "
                    f"{run.resolution}x{run.resolution}"
                )
        if "subject.png" in sizes and "subject_mask.png" in sizes and sizes["subject.png"] != sizes["subject_mask.png"]:
            p.append(f"{name}: {key}: subject.png is {sizes['subject.png']} but subject_mask.png is {sizes['subject_mask.png']}")
        if "json" in s:
            try:
                meta = json.loads(s["json"])
                if meta.get("key") != key:
                    p.append(f"{name}: {key}.json: key = {meta.get('key')!r}")
            except Exception as e:
                p.append(f"{name}: {key}.json: not JSON: {e}")
    if n != len(run.members):
        p.append(f"webdataset yielded {n} samples but the tars hold {len(run.members)} keys")
    if len(member_sets) > 1:
        full = set(MEMBERS)
        for ms, where in sorted(member_sets.items(), key=lambda kv: -len(kv[1])):
            missing, extra = sorted(full - ms), sorted(ms - full)
            if not missing and not extra:
                continue
            kept = sorted({str(run.records.get(w, {}).get("kept")) for w in where})
            p.append(
                f"{len(where)} sample(s) have a different member set"
                + (f": lack {', '.join(missing)}" if missing else "")
                + (f"; extra {', '.join(extra)}" if extra else "")
                + f" (kept = {'/'.join(kept)}; e.g. "
                + summarize(f"{a}: {b}" for a, b in where)
                + ")"
            )
    elif member_sets:
        (ms,) = member_sets
        if set(ms) != set(MEMBERS):
            p.append(f"every sample has members {sorted(ms)}, expected {list(MEMBERS)}")
    # each shard alone, as a worker that is handed one shard sees it (default empty_check)
    for u in urls:
        try:
            sum(1 for _ in wds.WebDataset([u], shardshuffle=False))
        except Exception as e:
            p.append(
                f"{os.path.basename(u)} alone: WebDataset raised {type(e).__name__}: "
                f"{str(e).splitlines()[0]} (the tar has {sum(1 for (t, _) in run.members if t == os.path.basename(u))} samples)"
            )
    return p


def _hf_leaf_nulls(features, path=""):
    """Paths of null-typed leaves in a datasets Features tree."""
    from datasets import Value

    out = []
    if isinstance(features, dict):
        for k, v in features.items():
            out += _hf_leaf_nulls(v, f"{path}.{k}" if path else k)
    elif isinstance(features, Value):
        if features.dtype == "null":
            out.append(path)
    elif hasattr(features, "feature"):  # List / Sequence / LargeList
        out += _hf_leaf_nulls(features.feature, path + "[]")
    return out


def _hf_flat(features, path=""):
    """{path: type string} of a datasets Features tree."""
    from datasets import Value

    out = {}
    if isinstance(features, dict):
        for k, v in features.items():
            out.update(_hf_flat(v, f"{path}.{k}" if path else k))
    elif hasattr(features, "feature") and not isinstance(features, Value):
        out.update(_hf_flat(features.feature, path + "[]"))
        out[path] = type(features).__name__
    else:
        out[path] = repr(features)
    return out


def _err(e):
    """An exception and its causes, one line."""
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        parts.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        e = e.__cause__ or e.__context__
    return " <- ".join(parts)


HF_HINTS = (
    ("Python int too large to convert to C long", "a JSON integer >= 2**63, e.g. a seed: see index-types"),
    ("Must pass at least one table", "the shard has no samples"),
    ("don't share the same prefix or the same types", "samples with different member sets: see webdataset"),
    ("Couldn't cast array of type", "a field null (or one type) in the first samples, another type later"),
)


def _hf_hint(msg):
    for needle, hint in HF_HINTS:
        if needle in msg:
            return f" [{hint}]"
    return ""


def check_hf(run):
    import datasets
    from datasets import load_dataset

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    p = Problems()
    urls = [t for t in run.tars if os.path.isfile(t)]
    with tempfile.TemporaryDirectory(prefix="toffee-hf-") as cache:

        def load(files):
            ds = load_dataset(
                "webdataset", data_files={"train": files}, split="train", cache_dir=cache
            )
            rows = 0
            for row in ds:
                rows += 1
            return ds, rows

        whole = None
        try:
            whole, rows = load(urls)
        except Exception as e:
            p.append(f"load_dataset over all {len(urls)} shards failed: {_err(e)}{_hf_hint(_err(e))}")
        if whole is not None:
            if rows != len(run.members):
                p.append(f"load_dataset gave {rows} rows; the tars hold {len(run.members)} samples")
            for path in _hf_leaf_nulls(whole.features):
                if path.endswith("[]"):  # items of arrays that are always empty: consistent
                    p.notes.append(f"all shards: feature {path} has type null (the array is always empty); "
                                   "a run where it is not empty has another schema")
                else:
                    p.append(f"all shards: feature {path} has type null (every value null), "
                             "so a run where it has values cannot be concatenated with this one")
            # rows with a member missing (the column exists because another sample had it)
            for row in whole:
                for m in MEMBERS:
                    if m in whole.features and row.get(m) is None:
                        p.append(f"{os.path.basename(row.get('__url__', '?'))}: {row.get('__key__')}: column {m} is None")
        # the folder itself, through its dataset card (README.md's `configs` header)
        try:
            ds = load_dataset(run.dir, split="train", cache_dir=cache)
            rows = sum(1 for _ in ds)
            if rows != len(run.members):
                p.append(f"load_dataset(DIR) by the card gave {rows} rows; the tars hold {len(run.members)} samples")
        except Exception as e:
            p.append(f"load_dataset(DIR) by the dataset card failed: {_err(e)}{_hf_hint(_err(e))}")
        # each shard alone: what a job that splits shards across nodes/workers loads
        flat_whole = _hf_flat(whole.features) if whole is not None else None
        schemas = {}
        for u in urls:
            name = os.path.basename(u)
            try:
                ds, _ = load([u])
            except Exception as e:
                n = sum(1 for (t, _) in run.members if t == name)
                p.append(f"{name} alone: load_dataset failed: {_err(e)}{_hf_hint(_err(e))} (the tar has {n} samples)")
                continue
            flat = _hf_flat(ds.features)
            schemas[name] = flat
            ref = flat_whole if flat_whole is not None else next(iter(schemas.values()))
            ref_name = "all shards" if flat_whole is not None else next(iter(schemas))
            diff = sorted(k for k in set(ref) | set(flat) if ref.get(k) != flat.get(k))
            if diff:
                p.append(
                    f"{name} alone: features differ from {ref_name}: "
                    + "; ".join(f"{k}: {flat.get(k, 'absent')} here, {ref.get(k, 'absent')} in {ref_name}" for k in diff[:8])
                    + (f"; … ({len(diff)} in all)" if len(diff) > 8 else "")
                )
    return p


def _arrow_nulls(t, path=""):
    import pyarrow as pa

    out = []
    if pa.types.is_null(t):
        out.append(path)
    elif pa.types.is_struct(t):
        for i in range(t.num_fields):
            f = t.field(i)
            out += _arrow_nulls(f.type, f"{path}.{f.name}" if path else f.name)
    elif pa.types.is_list(t) or pa.types.is_large_list(t):
        out += _arrow_nulls(t.value_type, path + "[]")
    return out


def check_pyarrow(run):
    import pyarrow as pa
    import pyarrow.json as pj

    p = Problems()
    schemas = {}
    for f in [os.path.join(run.dir, "index.jsonl")] + run.shard_jsonl:
        name = os.path.basename(f)
        if not os.path.isfile(f):
            continue
        if os.path.getsize(f) == 0:
            p.append(f"{name}: empty file (pyarrow cannot read it)")
            continue
        try:
            t = pj.read_json(f)
        except Exception as e:
            p.append(f"{name}: read_json failed: {_err(e)}")
            continue
        schemas[name] = t.schema
        for field in t.schema:
            for path in _arrow_nulls(field.type, field.name):
                p.append(f"{name}: column {path} has type null (every value null)")
        if "seed" in t.column_names:
            ty = t.schema.field("seed").type
            if ty != pa.int64():
                big = [r for r in read_jsonl(f, Problems()) if isinstance(r.get("seed"), int) and not -(2**63) <= r["seed"] < 2**63]
                p.append(
                    f"{name}: seed read as {ty}, not int64"
                    + (f" (seeds above 2**63-1: {summarize(str(r['key']) + '=' + str(r['seed']) for r in big)})" if big else "")
                )
            else:
                want = [r.get("seed") for r in read_jsonl(f, Problems())]
                got = t.column("seed").to_pylist()
                bad = [(w, g) for w, g in zip(want, got) if w != g]
                if bad:
                    p.append(f"{name}: seed values changed by the reader: {summarize(bad)}")
        else:
            p.append(f"{name}: no seed column")
    if schemas:
        ref_name = "index.jsonl" if "index.jsonl" in schemas else next(iter(schemas))
        ref = schemas[ref_name]
        for name, s in schemas.items():
            if name == ref_name:
                continue
            diffs = []
            for fld in set(ref.names) | set(s.names):
                a = ref.field(fld).type if fld in ref.names else "absent"
                b = s.field(fld).type if fld in s.names else "absent"
                if str(a) != str(b):
                    diffs.append(f"{fld}: {b} (in {ref_name}: {a})")
            if diffs:
                p.append(f"{name}: schema differs from {ref_name}: " + "; ".join(sorted(diffs)))
    return p


def _type_report(records, label, where):
    """Problems for fields whose JSON type differs across `records` (lists of (id, parsed))."""
    p = Problems()
    types = {}
    keysets = {}
    for rid, r in records:
        keysets.setdefault(frozenset(r), []).append(rid)
        for path, v in nodes(r):
            if not path:
                continue
            types.setdefault(path, {}).setdefault(jtype(v), []).append(rid)
    if len(keysets) > 1:
        allkeys = set().union(*keysets)
        for ks, ids in keysets.items():
            if ks != allkeys:
                p.append(f"{label}: {len(ids)} record(s) lack {sorted(allkeys - ks)} (e.g. {summarize(ids)})")
    for path, by in sorted(types.items()):
        if len(by) > 1 and not set(by) <= {"integer", "float"}:
            p.append(
                f"{label}: field {path} has {len(by)} JSON types: "
                + "; ".join(f"{t} in {len(ids)} (e.g. {where(ids[0])})" for t, ids in sorted(by.items()))
            )
        elif len(by) > 1:  # integer and float mixed: 1 vs 1.0
            p.append(
                f"{label}: field {path} mixes integer and float: "
                + "; ".join(f"{t} in {len(ids)} (e.g. {where(ids[0])})" for t, ids in sorted(by.items()))
            )
    return p


def check_index_types(run):
    p = Problems()
    recs = [(r.get("key"), r) for r in run.index]
    p += _type_report(recs, "index.jsonl", lambda k: k)
    seen = {}
    for r in run.index:
        k = r.get("key")
        if k in seen:
            p.append(f"index.jsonl: key {k} appears twice")
        seen[k] = 1
    bad = []
    for r in run.index:
        s = r.get("seed")
        if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s < 2**53:
            bad.append(f"{r.get('key')}: seed = {s!r}")
    if bad:
        p.append(
            f"index.jsonl: {len(bad)} of {len(run.index)} seeds are not integers in [0, 2**53) "
            f"(JSON readers that use doubles round them): {summarize(bad)}"
        )
    return p


def check_json_vs_index(run):
    p = Problems()
    floats = {}  # path -> [(where, KEY.json, index.jsonl)]: floats that print differently
    for (name, key), meta in run.records.items():
        line = run.by_key.get(key)
        if line is None:
            p.append(f"{name}: {key}.json has no index.jsonl line")
            continue
        a = dict(walk(meta))
        b = dict(walk(line))
        # compare leaves; a path that is an object on one side and a leaf on the other differs
        for path in sorted(set(a) & set(b)):
            if printed(a[path]) != printed(b[path]):
                if isinstance(a[path], float) and isinstance(b[path], float):
                    floats.setdefault(path, []).append((f"{name}: {key}", a[path], b[path]))
                    continue
                p.append(
                    f"{name}: {key}: {path}: KEY.json {printed(a[path])} vs index.jsonl {printed(b[path])}"
                )
        tops = set(meta) & set(line)
        for k in sorted(tops):
            if isinstance(meta[k], dict) != isinstance(line[k], dict):
                p.append(f"{name}: {key}: {k}: KEY.json {jtype(meta[k])} vs index.jsonl {jtype(line[k])}")
    for path, hits in sorted(floats.items()):
        where, x, y = hits[0]
        p.append(
            f"{path}: printed differently in KEY.json and index.jsonl for {len(hits)} of "
            f"{len(run.records)} record(s), e.g. {where}: KEY.json {printed(x)} vs index.jsonl {printed(y)}"
            + (" (KEY.json has the f32 widened to f64)" if widened_f32(x) == repr(y) else "")
        )
    recs = [(f"{n}: {k}", r) for (n, k), r in run.records.items()]
    p += _type_report(recs, "KEY.json", lambda i: i)
    bad = [f"{n}: {k}: seed = {r.get('seed')!r}" for (n, k), r in run.records.items()
           if not (isinstance(r.get("seed"), int) and 0 <= r["seed"] < 2**53)]
    if bad:
        p.append(f"KEY.json: {len(bad)} of {len(run.records)} seeds are not integers in [0, 2**53): {summarize(bad)}")
    return p


def check_f32(run):
    p = Problems()
    found = {}  # (file label, path) -> [(where, value, short)]

    def scan(label, where, value):
        for path, v in walk(value):
            s = widened_f32(v)
            if s is not None:
                found.setdefault((label, path), []).append((where, v, s))

    for (name, key), meta in run.records.items():
        scan("KEY.json", f"{name}: {key}", meta)
    for r in run.index:
        scan("index.jsonl", r.get("key"), r)
    scan("job.json", "job.json", run.job)
    scan("stats.json", "stats.json", json.load(open(os.path.join(run.dir, "stats.json"))))
    for (label, path), hits in sorted(found.items()):
        where, v, s = hits[0]
        p.append(
            f"{label}: {path} = {v!r} is the f32 {s} widened to f64 ({len(hits)} record(s), e.g. {where}); "
            "write the f32's shortest form"
        )
    return p


def check_config_names(run):
    p = Problems()
    cfg = run.config
    # 1. the records' settings against job.json's config (same names, same printed values)
    for (name, key), meta in list(run.records.items()):
        settings = meta.get("settings")
        if not isinstance(settings, dict):
            continue
        for sect, val in settings.items():
            if sect == "resolution":
                ref = cfg.get("job", {}).get("resolution")
                if printed(val) != printed(ref):
                    p.append(f"{name}: {key}: settings.resolution = {val!r} but job.json config.job.resolution = {ref!r}")
                continue
            if sect not in cfg:
                p.append(f"{name}: {key}: settings.{sect} has no section {sect!r} in job.json's config")
                continue
            a, b = dict(walk(val)), dict(walk(cfg[sect]))
            for path in sorted(set(a) | set(b)):
                if path not in b:
                    p.append(f"{name}: {key}: settings.{sect}.{path} is not in job.json config.{sect}")
                elif path not in a:
                    p.append(f"{name}: {key}: job.json config.{sect}.{path} is missing from settings.{sect}")
                elif printed(a[path]) != printed(b[path]):
                    p.append(
                        f"{name}: {key}: settings.{sect}.{path} = {printed(a[path])} but job.json "
                        f"config.{sect}.{path} = {printed(b[path])}"
                    )
    # 2. concept names: a config list `things` picks a record's `thing` in the object of the same
    #    name (config view.azimuths -> record view.azimuth)
    for sect, val in cfg.items():
        if not isinstance(val, dict):
            continue
        lists = [k for k, v in val.items() if isinstance(v, list) and k.endswith("s") and k != "lora"]
        objs = [(n, k, r[sect]) for (n, k), r in run.records.items() if isinstance(r.get(sect), dict)]
        if not lists or not objs:
            continue
        fields = set().union(*(set(o) for _, _, o in objs))
        singulars = {k: k[:-1] for k in lists}
        unmatched_cfg = sorted(k for k, s in singulars.items() if s not in fields)
        unmatched_rec = sorted(f for f in fields if f not in singulars.values())
        for k in unmatched_cfg:
            p.append(
                f"config {sect}.{k} has no record field {sect}.{singulars[k]} in KEY.json "
                f"(record {sect} fields: {', '.join(sorted(fields))}; without a config list: "
                f"{', '.join(unmatched_rec) or 'none'}; e.g. {objs[0][0]}: {objs[0][1]}) — one concept, two names?"
            )
    # 3. the thresholds in stats.json are the config's filter
    stats = json.load(open(os.path.join(run.dir, "stats.json")))
    th, flt = stats.get("thresholds"), cfg.get("filter")
    if isinstance(th, dict) and isinstance(flt, dict):
        for k in sorted(set(th) | set(flt)):
            if printed(th.get(k)) != printed(flt.get(k)):
                p.append(f"stats.json thresholds.{k} = {printed(th.get(k))} but job.json config.filter.{k} = {printed(flt.get(k))}")
    return _dedupe_settings(p)


def _dedupe_settings(p):
    """Collapse per-record settings problems that repeat for every record into one line."""
    out, counts, first = Problems(), {}, {}
    for msg in p:
        head, sep, rest = msg.partition(": ")
        head2, sep2, rest2 = rest.partition(": ")
        if sep and sep2 and head.startswith("pairs-") and rest2.startswith(("settings.", "job.json config")):
            counts[rest2] = counts.get(rest2, 0) + 1
            first.setdefault(rest2, f"{head}: {head2}")
        else:
            out.append(msg)
    for rest, n in counts.items():
        out.append(f"KEY.json {rest} ({n} record(s), e.g. {first[rest]})")
    return out


CHECKS = [
    ("layout", check_layout),
    ("webdataset", check_webdataset),
    ("hf-datasets", check_hf),
    ("pyarrow-json", check_pyarrow),
    ("index-types", check_index_types),
    ("json-vs-index", check_json_vs_index),
    ("f32-widening", check_f32),
    ("config-names", check_config_names),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", help="a `toffee pairs --out` folder")
    ap.add_argument("--only", action="append", help="run only these checks (repeatable)")
    ap.add_argument("--all-problems", action="store_true", help=f"print every problem, not {MAX_PROBLEMS}")
    a = ap.parse_args()
    if not os.path.isfile(os.path.join(a.dir, "job.json")):
        print(f"{a.dir}: no job.json (not a toffee pairs output folder)", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore")
    logging.getLogger("datasets").setLevel(logging.ERROR)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    t0 = time.perf_counter()
    try:
        run = Run(a.dir)
    except Exception as e:
        print(f"FAIL setup: cannot read {a.dir}: {_err(e)}")
        return 1
    failed = []
    for name, fn in CHECKS:
        if a.only and name not in a.only:
            continue
        t = time.perf_counter()
        try:
            problems = fn(run)
        except Exception as e:
            tb = traceback.extract_tb(e.__traceback__)[-1]
            problems = [f"the check itself raised {_err(e)} (at {os.path.basename(tb.filename)}:{tb.lineno})"]
        dt = time.perf_counter() - t
        if problems:
            failed.append(name)
            print(f"FAIL {name} ({dt:.1f}s): {len(problems)} problem(s)")
            shown = problems if a.all_problems else problems[:MAX_PROBLEMS]
            for msg in shown:
                print(f"    - {msg}")
            if len(problems) > len(shown):
                print(f"    … and {len(problems) - len(shown)} more (--all-problems)")
        else:
            print(f"PASS {name} ({dt:.1f}s)")
        for msg in getattr(problems, "notes", []):
            print(f"    note: {msg}")
        sys.stdout.flush()
    total = time.perf_counter() - t0
    print(
        f"{a.dir}: {len(failed)} of {len(CHECKS) if not a.only else len(a.only)} checks failed"
        + (f" ({', '.join(failed)})" if failed else "")
        + f"; {len(run.index)} index records, {len(run.members)} tar samples; {total:.1f}s"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
