"""Shared fixtures: the toffee CLI the package is compared with, the repository's test data."""

import os
import pathlib
import subprocess

import pytest

REPO = pathlib.Path(os.environ.get("TOFFEE_REPO", pathlib.Path(__file__).resolve().parents[2]))
FIXTURES = REPO / "tests" / "fixtures"


@pytest.fixture(scope="session")
def cli():
    """Runs the toffee CLI (TOFFEE, else target/debug/toffee) and returns its stdout; fails the
    test with its stderr when it exits non-zero."""
    exe = os.environ.get("TOFFEE", str(REPO / "target" / "debug" / "toffee"))
    if not os.access(exe, os.X_OK):
        pytest.fail(f"no toffee binary at {exe} (cargo build --bin toffee, or set TOFFEE)")

    def run(*args):
        p = subprocess.run([exe, *map(str, args)], capture_output=True, text=True)
        assert p.returncode == 0, f"toffee {' '.join(map(str, args))} failed:\n{p.stderr}"
        return p.stdout

    return run


def read_safetensors(path):
    """A safetensors file's F32 tensors as numpy arrays (the format is a JSON header and raw
    little-endian data; no extra dependency for the tests)."""
    import json
    import struct

    import numpy as np

    raw = pathlib.Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        assert t["dtype"] == "F32", (name, t["dtype"])
        a, b = t["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype="<f4").reshape(t["shape"])
    return out
