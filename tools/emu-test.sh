#!/usr/bin/env bash
# The GPU tests on the software GPU (issue 23): the CUDA backend's own code — pool, graphs, launch
# shapes, cuBLASLt/cuDNN descriptors, every kernel of kernels/ compiled as host C++ — on the CPU.
# With the `emu` feature no GPU test skips. Then the kernel suite (every op against the CPU backend,
# tuned and reference kernels) in the shim's other three modes: cp.async copies landing at issue or
# at the wait, threads in order or warp-skewed (each mode catches bugs the others miss).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --features emu --lib backend::
cargo test --features emu --test gpu
for mode in "wait inorder" "issue skew:1" "wait skew:2"; do
    read -r cp sched <<<"$mode"
    echo "kernel suite: cp.async at $cp, schedule $sched"
    TOFFEE_EMU_CPASYNC=$cp TOFFEE_EMU_SCHEDULE=$sched cargo test -q --features emu --test gpu -- \
        ops_match_the_cpu_backend tuned_and_reference_kernels_match_the_cpu_backend
done
