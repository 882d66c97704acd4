#!/usr/bin/env bash
# Prints docs/perf.md's kernel-resource table: every kernel in kernels/*.cu compiled for sm_90 with
# `-Xptxas -v`, registers (max over its dtype instances), spill bytes and static shared memory.
# No GPU needed. NVCC defaults to the pinned compiler tools/install-nvcc.sh installs.
set -euo pipefail
cd "$(dirname "$0")/.."
nvcc="${NVCC:-$(tools/install-nvcc.sh)}"
# The head dims of kernels/dims.rs, as build.rs writes them for the kernels (toffee_dims.h).
gen="$(mktemp -d)"
trap 'rm -rf "$gen"' EXIT
dims=$(grep -o '\[[0-9, ]*\]' kernels/dims.rs | tr -d '[],')
printf '#pragma once\n#define TOFFEE_FLASH_DIMS(X, S, T) %s\n' "$(for d in $dims; do printf 'X(S, T, %s) ' "$d"; done)" > "$gen/toffee_dims.h"
for f in kernels/*.cu; do
    "$nvcc" -cubin -O3 -std=c++17 -gencode arch=compute_90,code=sm_90 -Xptxas -v -I kernels -I "$gen" \
        -o /dev/null "$f" 2>&1
done | python3 -c '
import re, sys, collections
rows = collections.OrderedDict()
cur = None
for line in sys.stdin:
    m = re.search(r"Compiling entry function .(\w+). for", line)
    if m:
        cur = re.sub(r"_(f16|bf16|f32|i32)$", "", m.group(1))
        r = rows.setdefault(cur, [0, 0, 0, 0])
        r[0] += 1
        continue
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and cur:
        rows[cur][2] = max(rows[cur][2], int(m.group(1)) + int(m.group(2)))
    m = re.search(r"Used (\d+) registers", line)
    if m and cur:
        rows[cur][1] = max(rows[cur][1], int(m.group(1)))
        s = re.search(r"(\d+) bytes smem", line)
        rows[cur][3] = max(rows[cur][3], int(s.group(1)) if s else 0)
print("| kernel (all dtypes) | registers (max) | spill bytes | static smem bytes |")
print("|---|---|---|---|")
for k in sorted(rows):
    n, reg, spill, smem = rows[k]
    print(f"| `{k}` ({n}) | {reg} | {spill} | {smem} |")
print(f"\n{sum(r[0] for r in rows.values())} entry points")
'
