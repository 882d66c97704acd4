#!/usr/bin/env bash
# Run ON THE GPU MACHINE from the repository root, after tools/device/build.sh here and with
# build-device/ carried: GPU tests against the CPU backend, `toffee bench` on the real SD
# configurations (random weights), and the kernel benchmarks. Writes everything under $OUT
# (results.md is the table for docs/perf.md).
#
# Time: a lent GPU is there for minutes, so the whole script runs against one deadline,
# TOFFEE_DEVICE_BUDGET seconds (default 420 = 7 min, inside an 8-minute call): every part gets
# at most its own limit and never more than what is left, and a part that would start with less
# than 20 s left is skipped and logged as such. The core parts (GPU tests, the four goal
# benchmarks, the pairs smoke test) run first; the rest only with TOFFEE_DEVICE_FULL=1.
set -uo pipefail
OUT="${OUT:-/tmp/toffee-device-out}"
mkdir -p "$OUT"
B="$PWD/build-device"
BUDGET="${TOFFEE_DEVICE_BUDGET:-420}"
FULL="${TOFFEE_DEVICE_FULL:-0}"
START=$SECONDS
log() { echo "$*" | tee -a "$OUT/results.md"; }
# limit SECONDS: prints min(SECONDS, time left), or fails when under 20 s are left.
limit() {
    local left=$((BUDGET - (SECONDS - START)))
    [ "$left" -ge 20 ] || return 1
    echo $(($1 < left ? $1 : left))
}

log "# toffee device run, $(date -u +%Y-%m-%dT%H:%MZ) (budget ${BUDGET}s, full=$FULL)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.csv" 2>&1
log "card: $(tail -n 1 "$OUT/gpu.csv")"
timeout 30 "$B/toffee" devices > "$OUT/devices.txt" 2>&1
log '```'; cat "$OUT/devices.txt" | tee -a "$OUT/results.md"; log '```'

log "## GPU tests (CUDA vs CPU backend)"
if t=$(limit 180); then
    TOFFEE_FIXTURES="$PWD/tests/fixtures" TOFFEE_BIN="$B/toffee" timeout "$t" "$B/gpu-tests" --nocapture --test-threads 1 > "$OUT/gpu-tests.log" 2>&1
    log "exit status $? after $((SECONDS - START))s (full log: gpu-tests.log)"
    grep -E "^test |rel L2|panicked|test result" "$OUT/gpu-tests.log" | tail -n 80 >> "$OUT/results.md"
else
    log "skipped: out of time"
fi

log "## toffee bench (fp16, random weights, CUDA graph replay)"
log "| config | component | batch | resolution | ms/call | calls/s |"
log "|---|---|---|---|---|---|"
bench() {
    local line t
    t=$(limit 60) || { log "| $* | skipped: out of time | | | | |"; return; }
    line="$(timeout "$t" "$B/toffee" bench --device cuda --json --iters 20 --warmup 3 "$@" 2>>"$OUT/bench.err")" || { log "| $* | failed (see bench.err) | | | | |"; return; }
    echo "$line" >> "$OUT/bench.jsonl"
    python3 - "$line" <<'PY' | tee -a "$OUT/results.md"
import json, sys
r = json.loads(sys.argv[1])
print(f"| {r['config']} | {r['component']} | {r['batch']} | {r['resolution']} | {r['ms_per_call']:.3f} | {r['calls_per_s']:.1f} |")
PY
}
# The goals of DESIGN.md §4 first.
bench --config sd15 --component unet --batch 32
bench --config sd15 --component unet --batch 2
bench --config sdxl --component unet --batch 8
bench --config sd15 --component vae-decode --batch 8
# The same UNet on the first pass's kernels: what the tuned kernels bought, measured in this run.
log "| (next row: TOFFEE_KERNELS=reference) | | | | | |"
TOFFEE_KERNELS=reference bench --config sd15 --component unet --batch 2
log "| (next row: TOFFEE_AUTOTUNE=1) | | | | | |"
TOFFEE_AUTOTUNE=1 bench --config sd15 --component unet --batch 2

log "## toffee pairs demo on the GPU (built-in tiny models: a smoke test of the GPU data path, not a benchmark)"
if t=$(limit 60); then
    timeout "$t" "$B/toffee" pairs --out "$OUT/pairs-demo" --devices cuda:0 --bench >> "$OUT/pairs.json" 2>>"$OUT/pairs.err" && log "pairs demo: ok (pairs.json)" || log "pairs demo: failed (see pairs.err)"
else
    log "skipped: out of time"
fi

if [ "$FULL" = 1 ]; then
    bench --config sd15 --component text-encoder --batch 64
    bench --config sd15 --component controlnet --batch 2
    bench --config zero123 --component unet --batch 16
    bench --config dinov2-b14 --component image-encoder --batch 32
    bench --config clip-l14 --component image-encoder --batch 32
    log "## kernel benchmarks (criterion)"
    if t=$(limit 180); then
        timeout "$t" "$B/gpu-kernels" --bench > "$OUT/kernels.log" 2>&1
        grep -E "^gpu/|time:|thrpt:" "$OUT/kernels.log" >> "$OUT/results.md"
    else
        log "skipped: out of time"
    fi
else
    log "(the other benchmarks and the kernel benchmarks run with TOFFEE_DEVICE_FULL=1)"
fi
log "done after $((SECONDS - START))s"
