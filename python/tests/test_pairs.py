"""toffee.pairs against `toffee pairs` on the built-in demo: the same records, shards that
webdataset reads, a dict config, a progress callback that stops the run, and Ctrl-C
(KeyboardInterrupt) stopping cleanly with the folder resumable."""

import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import webdataset as wds

import toffee

MEMBERS = {"subject.png", "subject_mask.png", "target.png", "target_mask.png", "source.png",
           "edit_mask.png", "json"}
# A small job on the built-in models (tests/suite/pairs.rs's tiny config).
TINY = {
    "job": {"resolution": 64, "prompts_per_subject": 1, "shard_size": 2, "batch": 2},
    "draft": {"steps": 2},
    "refine": {"steps": 2},
    "view": {"probability": 0.0},
    "filter": {"dino": -1.0, "clip_i": -1.0, "clip_t": -1.0},
}


def index(out):
    lines = (out / "index.jsonl").read_text().splitlines()
    return {r["key"]: r for r in map(json.loads, lines)}


def same_records(a, b):
    """The Rust suite's rule: fields equal, scores within 1e-4 (batching may reorder sums)."""
    ia, ib = index(a), index(b)
    assert sorted(ia) == sorted(ib)
    for k, ra in ia.items():
        rb = ib[k]
        for f in ("prompt", "seed", "kept", "shard", "template", "subject"):
            assert ra[f] == rb[f], (k, f)
        for s in ("dino", "clip_i", "clip_t"):
            assert abs(ra["scores"][s] - rb["scores"][s]) < 1e-4, (k, s)


def no_temporaries(out):
    left = [p.name for p in out.iterdir() if ".tmp." in p.name]
    assert not left, left


@pytest.fixture(scope="module")
def cli_demo(cli, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "demo"
    cli("pairs", "--out", out)
    return out


def test_the_demo_equals_the_cli_and_webdataset_reads_it(cli_demo, tmp_path):
    out = tmp_path / "demo"
    calls = []
    summary = toffee.pairs(out, progress=lambda done, total: calls.append((done, total)))
    assert summary["records"] == 6 and summary["kept"] + summary["rejected"] == 6
    assert summary["shards_built"] == 2 and summary["shards_skipped"] == 0
    assert summary["stopped"] is False
    assert [t for _, t in calls] == [6, 6] and calls[-1][0] == 6
    assert index(out) == index(cli_demo), "the same records, scores to the last digit"
    # webdataset groups each record's members by key.
    urls = sorted(str(p) for p in out.glob("pairs-*.tar"))
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))
    kept = {k: r for k, r in index(out).items() if r["kept"]}
    assert kept and sorted(s["__key__"] for s in samples) == sorted(kept)
    for s in samples:
        assert MEMBERS <= set(s), set(s)
        assert s["target.png"].dtype == np.uint8 and s["target.png"].shape == (128, 128, 3)
        assert s["json"]["prompt"] == kept[s["__key__"]]["prompt"]
    # A rerun finds every shard done.
    again = toffee.pairs(out)
    assert again["shards_built"] == 0 and again["shards_skipped"] == 2
    assert index(out) == index(cli_demo)


def test_a_dict_config_equals_the_same_toml_file(cli, tmp_path, monkeypatch):
    # A dict is written as TOML in the current folder (its relative paths are relative to it).
    monkeypatch.chdir(tmp_path)
    toml = tmp_path / "tiny.toml"
    toml.write_text("".join(
        f"[{table}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
        for table, values in TINY.items()))
    cli("pairs", "--config", toml, "--out", tmp_path / "cli")
    summary = toffee.pairs(tmp_path / "py", TINY)
    assert summary["records"] == 3
    assert index(tmp_path / "py") == index(tmp_path / "cli")
    assert not list(tmp_path.glob(".toffee-pairs-config.*")), "the temporary config is removed"


def test_ctrl_c_stops_cleanly_and_a_rerun_completes(cli_demo, tmp_path):
    out = tmp_path / "out"
    sent = []

    def ctrl_c_once_started():
        # As tests/suite/pairs.rs does: job.json is written before any model loads.
        deadline = time.monotonic() + 120
        while not (out / "job.json").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    # batch 1: every shard is several batches, so the stop drops the one in progress part-way.
    threading.Thread(target=ctrl_c_once_started, daemon=True).start()
    try:
        summary = toffee.pairs(out, batch=1)
    except KeyboardInterrupt:
        stopped_at = time.monotonic()
    else:
        pytest.fail(f"not interrupted (signal sent: {bool(sent)}): {summary}")
    assert sent and stopped_at - sent[0] < 30, "stopped after the batch in flight"
    no_temporaries(out)
    assert len(list(out.glob("pairs-*.tar"))) < 2, "the unfinished shard was dropped"
    summary = toffee.pairs(out)
    assert summary["shards_built"] + summary["shards_skipped"] == 2
    assert summary["shards_built"] >= 1
    assert summary["records"] == 6 and not summary["stopped"]
    same_records(out, cli_demo)


def test_a_progress_callback_stops_the_run(cli_demo, tmp_path):
    out = tmp_path / "out"
    summary = toffee.pairs(out, batch=1, progress=lambda done, total: True)
    assert summary["stopped"] is True and summary["shards_built"] == 1
    no_temporaries(out)

    def fails(done, total):
        raise ValueError("from the callback")

    with pytest.raises(ValueError, match="from the callback"):
        toffee.pairs(out, batch=1, progress=fails)
    no_temporaries(out)
    assert not toffee.pairs(out)["stopped"]
    same_records(out, cli_demo)


def test_bad_pairs_input_raises_toffee_error(tmp_path):
    with pytest.raises(toffee.ToffeeError, match="resolution"):
        toffee.pairs(tmp_path / "a", {"job": {"resolution": 100}})
    with pytest.raises(toffee.ToffeeError, match="nowhere.toml"):
        toffee.pairs(tmp_path / "b", tmp_path / "nowhere.toml")
    with pytest.raises(toffee.ToffeeError, match="TOML-compatible"):
        toffee.pairs(tmp_path / "c", {"job": {"resolution": None}})
    with pytest.raises(toffee.ToffeeError, match="shard_index and num_shards"):
        toffee.pairs(tmp_path / "d", shard_index=0)
