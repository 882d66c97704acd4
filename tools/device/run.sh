#!/usr/bin/env bash
# Run ON THE GPU MACHINE from the repository root, after tools/device/build.sh here and with
# build-device/ carried: GPU tests against the CPU backend, `toffee bench` on the real SD
# configurations (random weights), and the kernel benchmarks. Writes everything under $OUT
# (results.md is the table for docs/perf.md). Each part has its own time limit so one hang
# does not eat the device budget.
set -uo pipefail
OUT="${OUT:-/tmp/toffee-device-out}"
mkdir -p "$OUT"
B="$PWD/build-device"
log() { echo "$*" | tee -a "$OUT/results.md"; }

log "# toffee device run, $(date -u +%Y-%m-%dT%H:%MZ)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.csv" 2>&1
log "card: $(tail -n 1 "$OUT/gpu.csv")"
"$B/toffee" devices > "$OUT/devices.txt" 2>&1
log '```'; cat "$OUT/devices.txt" | tee -a "$OUT/results.md"; log '```'

log "## GPU tests (CUDA vs CPU backend)"
TOFFEE_FIXTURES="$PWD/tests/fixtures" TOFFEE_BIN="$B/toffee" timeout 240 "$B/gpu-tests" --nocapture --test-threads 1 > "$OUT/gpu-tests.log" 2>&1
log "exit status $? (full log: gpu-tests.log)"
grep -E "^test |rel L2|panicked|test result" "$OUT/gpu-tests.log" | tail -n 60 >> "$OUT/results.md"

log "## toffee bench (fp16, random weights, CUDA graph replay)"
log "| config | component | batch | resolution | ms/call | calls/s |"
log "|---|---|---|---|---|---|"
bench() {
    local line
    line="$(timeout 120 "$B/toffee" bench --device cuda --json --iters 20 --warmup 3 "$@" 2>>"$OUT/bench.err")" || { log "| $* | failed (see bench.err) | | | | |"; return; }
    echo "$line" >> "$OUT/bench.jsonl"
    python3 - "$line" <<'PY' | tee -a "$OUT/results.md"
import json, sys
r = json.loads(sys.argv[1])
print(f"| {r['config']} | {r['component']} | {r['batch']} | {r['resolution']} | {r['ms_per_call']:.3f} | {r['calls_per_s']:.1f} |")
PY
}
bench --config sd15 --component unet --batch 2
bench --config sd15 --component unet --batch 32
bench --config sdxl --component unet --batch 8
bench --config sd15 --component vae-decode --batch 8
bench --config sd15 --component text-encoder --batch 64
bench --config sd15 --component controlnet --batch 2
bench --config zero123 --component unet --batch 16
bench --config dinov2-b14 --component image-encoder --batch 32
bench --config clip-l14 --component image-encoder --batch 32
log "## toffee pairs demo on the GPU (built-in tiny models: a smoke test of the GPU data path, not a benchmark)"
timeout 120 "$B/toffee" pairs --out "$OUT/pairs-demo" --devices cuda:0 --bench >> "$OUT/pairs.json" 2>>"$OUT/pairs.err" && log "pairs demo: ok (pairs.json)" || log "pairs demo: failed (see pairs.err)"

log "## kernel benchmarks (criterion)"
timeout 180 "$B/gpu-kernels" --bench > "$OUT/kernels.log" 2>&1
grep -E "^gpu/|time:|thrpt:" "$OUT/kernels.log" >> "$OUT/results.md"
log "done"
