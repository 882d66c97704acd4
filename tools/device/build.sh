#!/usr/bin/env bash
# Run HERE (no GPU needed): builds the stripped release `toffee` binary and the GPU test and kernel
# benchmark executables with the CUDA backend into build-device/ (git-ignored), ready to carry to
# the GPU machine: run(command="bash tools/device/run.sh", carry=["build-device"]).
set -euo pipefail
cd "$(dirname "$0")/../.."
NVCC="$(tools/install-nvcc.sh)"
export NVCC
cargo build --release --features cuda --bin toffee
# The GPU test and kernel bench executables, by name, from cargo's JSON build messages.
exes="$(cargo test --release --features cuda --test gpu --bench gpu_kernels --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in ("gpu", "gpu_kernels"):
        print(m["target"]["name"], m["executable"])
')"
rm -rf build-device && mkdir -p build-device
cp target/release/toffee build-device/toffee
while read -r name exe; do
    case "$name" in
        gpu) cp "$exe" build-device/gpu-tests ;;
        gpu_kernels) cp "$exe" build-device/gpu-kernels ;;
    esac
done <<< "$exes"
strip build-device/*
ls -la build-device
du -sh build-device
