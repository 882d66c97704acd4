#!/usr/bin/env bash
# tools/compare/run.sh: diffusers vs toffee on the same configurations, in one device call.
#
# Run ON THE GPU MACHINE from the repository root, carrying build-device/ (bash
# tools/device/build.sh here) and .whl/ (bash tools/compare/fetch-wheels.sh here):
#     run(command="bash tools/compare/run.sh", carry=["build-device", ".whl"], timeout_s=540)
# It installs the diffusers wheel into /tmp/site, then
#   1. tools/compare/anchor.py per model (SD1.5 UNet b2/b32, SDXL UNet b8, SD VAE decode b8,
#      CLIP-L b64): diffusers/transformers fp16 calls/s eager and eager-in-a-CUDA-graph, and saves
#      each random-weight model with one set of inputs and its fp32 reference outputs;
#   2. build-device/toffee bench on the same configurations (random weights, src/configs.rs);
#   3. toffee forward --device cuda on each saved model, relative L2 against the fp32 reference
#      (must be < 1e-2);
#   4. torch.compile anchors with the time that is left (COMPILE=auto: SD1.5 UNet and CLIP-L;
#      COMPILE=all adds the VAE and SDXL; COMPILE=none);
# and prints the table (config | batch | diffusers eager | + graph | compile | toffee | ratio |
# rel L2). Everything lands in $OUT: results.md (the table and notes), raw.jsonl (every JSON
# line), run.log (all output). Every step has its own timeout and starts only while the budget
# (BUDGET_S, default 420 s) has time for it, so one hang cannot eat the device time, and a toffee
# failure still leaves the diffusers anchors in the table.
#
# Device-time estimate on one H100 (command wall time; the machine's start comes on top):
#   wheel install 5 s; anchors + saving the checks ~110 s (SDXL: 5 GB written); toffee bench
#   ~60 s (5 configs, random weights made on 16 cores); forward checks ~50 s; compile SD1.5 b2+b32
#   and CLIP-L ~150 s (whatever is left of the budget, else reported as skipped).
#   About 6-7 minutes in all, capped at BUDGET_S + ~15 s; give the run call timeout_s=540.
#
# For tests on a CPU (tiny configurations, the local toffee, no wheels):
#   DEVICE=cpu TINY=1 PYTHON=/work/fxenv/bin/python TOFFEE=target/release/toffee SKIP_WHEELS=1 \
#     OUT=/tmp/cmp-out bash tools/compare/run.sh
set -uo pipefail
ROOT="$PWD"
OUT="${OUT:-/tmp/toffee-compare-out}"
WORK="${COMPARE_WORK:-/tmp/toffee-compare}"
PY="${PYTHON:-python3}"
TOFFEE="${TOFFEE:-$ROOT/build-device/toffee}"
DEVICE="${DEVICE:-cuda}"
TINY="${TINY:-0}"
BUDGET_S="${BUDGET_S:-420}"
COMPILE="${COMPILE:-auto}"
THRESHOLD="${THRESHOLD:-1e-2}"
A="$ROOT/tools/compare/anchor.py"
R="$ROOT/tools/compare/report.py"
mkdir -p "$OUT"
rm -rf "$WORK"
mkdir -p "$WORK"
RAW="$OUT/raw.jsonl"
LOG="$OUT/run.log"
MD="$OUT/results.md"
: > "$RAW"
: > "$LOG"
export PYTHONUNBUFFERED=1
TINYF=()
[ "$TINY" = 1 ] && TINYF=(--tiny)
ANCHOR=("$PY" "$A" --device "$DEVICE" "${TINYF[@]}" --checks-dir "$WORK/checks" --jsonl "$RAW")

exec 3>&2  # log lines go to the original stderr even where a step's stderr is redirected
log() { echo "[$(date -u +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$LOG" >&3; }
left() { echo $((BUDGET_S - SECONDS)); }
# step NAME WANT MIN CMD...: runs CMD under timeout min(WANT, what is left of the budget);
# returns 99 without running it when less than MIN seconds are left, 124/137 on a timeout.
step() {
    local name=$1 want=$2 min=$3
    shift 3
    local l t rc
    l=$(left)
    t=$want
    [ "$l" -lt "$t" ] && t=$l
    if [ "$t" -lt "$min" ]; then
        log "SKIP $name: ${l}s of the ${BUDGET_S}s budget left, it needs ${min}s"
        return 99
    fi
    log "START $name (timeout ${t}s)"
    timeout -k 10 "$t" "$@" < /dev/null
    rc=$?
    log "END $name: exit $rc"
    return $rc
}
# fill MODEL CONFIGS MODES REASON: the table shows REASON for every (config, mode) pair that has
# no real result line (yet).
fill() {
    "$PY" "$R" fill "$RAW" --model "$1" --configs "$2" --modes "$3" --reason "$4"
}
why() {
    case "$1" in
        0) echo "printed no result (see run.log)" ;;
        99) echo "not started: the time budget ran out" ;;
        124 | 137) echo "killed at its time limit" ;;
        *) echo "exited with status $1 (see run.log)" ;;
    esac
}

{
    echo "# diffusers vs toffee, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    if command -v nvidia-smi > /dev/null; then
        echo "card: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 1)"
    fi
    echo "device: $DEVICE$([ "$TINY" = 1 ] && echo ' (tiny configurations)'), toffee: $TOFFEE, budget ${BUDGET_S}s"
    echo
    echo '```'
    timeout 60 "$TOFFEE" devices 2>&1 | head -n 8
    echo '```'
    echo
} > "$MD"

# ---- the diffusers wheel ----
if [ "${SKIP_WHEELS:-0}" != 1 ]; then
    if ls .whl/*.whl > /dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl >> "$LOG" 2>&1 || log "pip install of .whl/*.whl failed"
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        log "no .whl/*.whl: run tools/compare/fetch-wheels.sh here and carry .whl"
    fi
fi
if ! "$PY" -c "import diffusers, transformers, torch; print('diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)" >> "$LOG" 2>&1; then
    log "diffusers/transformers/torch do not import: the anchors will fail (see run.log)"
    echo "**diffusers, transformers or torch does not import with $PY: no anchors (see run.log).**" >> "$MD"
fi

# ---- the configurations ----
mapfile -t ROWS < <("$PY" "$A" --list-tsv "${TINYF[@]}" --checks-dir "$WORK/checks")
if [ "${#ROWS[@]}" -eq 0 ]; then
    log "anchor.py --list-tsv printed nothing"
fi
declare -A CONFIGS_OF
MODELS=()
for row in "${ROWS[@]}"; do
    IFS=$'\t' read -r -a f <<< "$row"
    if [ -z "${CONFIGS_OF[${f[1]}]:-}" ]; then
        MODELS+=("${f[1]}")
        CONFIGS_OF[${f[1]}]=${f[0]}
    else
        CONFIGS_OF[${f[1]}]+=",${f[0]}"
    fi
done
for m in "${MODELS[@]}"; do
    fill "$m" "${CONFIGS_OF[$m]}" eager,graph,compile "not run"
done

# ---- 1. diffusers anchors: eager + CUDA graph, and the correctness sets ----
declare -A WANT_S=([sd15-unet]=150 [sdxl-unet]=150 [sd-vae]=100 [clip-l]=70)
for m in "${MODELS[@]}"; do
    step "diffusers $m (eager, graph, check set)" "${WANT_S[$m]:-120}" 30 \
        "${ANCHOR[@]}" --configs "${CONFIGS_OF[$m]}" --modes eager,graph >> "$LOG" 2>&1
    rc=$?
    fill "$m" "${CONFIGS_OF[$m]}" eager,graph "anchor process $(why $rc)"
done

# ---- 2. toffee bench ----
# the last line toffee wrote to stderr (its error message), for the table's notes
last_err() { grep -v '^\s*$' "$WORK/err" 2> /dev/null | tail -n 1 | cut -c1-300; }
for row in "${ROWS[@]}"; do
    IFS=$'\t' read -r -a f <<< "$row"
    name=${f[0]}
    model=${f[1]}
    args=("${f[@]:2}")
    line=$(step "toffee bench $name" 150 20 "$TOFFEE" bench "${args[@]}" --device "$DEVICE" --json 2> "$WORK/err")
    rc=$?
    cat "$WORK/err" >> "$LOG"
    if [ $rc -eq 0 ] && [ -n "$line" ]; then
        "$PY" "$R" tag --kind toffee --config "$name" --model "$model" --json "$(tail -n 1 <<< "$line")" >> "$RAW"
    else
        "$PY" "$R" tag --kind toffee --config "$name" --model "$model" \
            --error "toffee bench $(why $rc)$([ $rc -ne 99 ] && [ -s "$WORK/err" ] && echo ": $(last_err)")" >> "$RAW"
    fi
done

# ---- 3. correctness: toffee forward vs diffusers in fp32 ----
mapfile -t CHECKS < <("$PY" "$R" checks-tsv "$RAW")
for row in "${CHECKS[@]}"; do
    IFS=$'\t' read -r check comp model inputs ref fp16 <<< "$row"
    got="$WORK/$check.toffee.safetensors"
    step "toffee forward $check" 150 20 "$TOFFEE" forward --model "$model" --component "$comp" \
        --inputs "$inputs" --out "$got" --device "$DEVICE" >> "$LOG" 2> "$WORK/err"
    rc=$?
    cat "$WORK/err" >> "$LOG"
    if [ $rc -eq 0 ]; then
        "$PY" "$R" check --check "$check" --ref "$ref" --got "$got" --fp16 "$fp16" \
            --threshold "$THRESHOLD" >> "$RAW" 2>> "$LOG"
    else
        "$PY" "$R" tag --kind forward-check --config "$check" \
            --error "toffee forward $(why $rc)$([ $rc -ne 99 ] && [ -s "$WORK/err" ] && echo ": $(last_err)")" >> "$RAW"
    fi
    rm -f "$got"
done

# ---- 4. torch.compile anchors, with what is left ----
case "$COMPILE" in
    none) COMPILE_MODELS=() ;;
    all) COMPILE_MODELS=(sd15-unet clip-l sd-vae sdxl-unet) ;;
    *) COMPILE_MODELS=(sd15-unet clip-l) ;;
esac
declare -A COMPILE_WANT=([sd15-unet]=240 [clip-l]=90 [sd-vae]=150 [sdxl-unet]=300)
declare -A COMPILE_MIN=([sd15-unet]=120 [clip-l]=45 [sd-vae]=90 [sdxl-unet]=180)
for m in "${MODELS[@]}"; do
    if [[ " ${COMPILE_MODELS[*]} " != *" $m "* ]]; then
        fill "$m" "${CONFIGS_OF[$m]}" compile \
            "not in COMPILE=$COMPILE (compiling this model takes minutes; COMPILE=all includes it)"
    fi
done
for m in "${COMPILE_MODELS[@]}"; do
    [ -n "${CONFIGS_OF[$m]:-}" ] || continue
    step "diffusers $m (torch.compile)" "${COMPILE_WANT[$m]:-150}" "${COMPILE_MIN[$m]:-90}" \
        "${ANCHOR[@]}" --no-checks --configs "${CONFIGS_OF[$m]}" --modes compile >> "$LOG" 2>&1
    rc=$?
    fill "$m" "${CONFIGS_OF[$m]}" compile "compile process $(why $rc)"
done

# ---- the table ----
"$PY" "$R" table "$RAW" > "$WORK/table.md" 2>> "$LOG"
{
    cat "$WORK/table.md"
    echo
    echo "raw JSON lines: raw.jsonl; full log: run.log; ${SECONDS}s in all."
} >> "$MD"
cat "$MD"
log "done"
# keep what comes back within the tool's limits (16 MiB a file)
if [ "$(stat -c %s "$LOG")" -gt 8000000 ]; then
    tail -c 8000000 "$LOG" > "$WORK/log.tail" && mv "$WORK/log.tail" "$LOG"
fi
