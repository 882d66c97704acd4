#!/usr/bin/env bash
# Builds a small demo with `toffee pairs` (a kept-only run and a --keep-rejected run, built-in tiny
# models on the CPU) and loads both with webdataset, Hugging Face datasets and pyarrow's JSON reader
# (tools/loaders/check_dataset.py). Exit status: 0 when every check passes on both folders.
#
#   bash tools/loaders/check.sh
#
# Environment:
#   TOFFEE               the toffee binary (default: toffee on PATH, else $repo/target/debug/toffee)
#   TOFFEE_LOADERS_VENV  the Python environment, made and reused here
#                        (default: $HOME/.cache/toffee/loaders-venv; rebuilt when requirements.txt changes)
#   PYTHON               the interpreter that makes the venv (default: python3, 3.11 or newer)
#   KEEP=1               keep the demo folders (their path is printed)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${TOFFEE_LOADERS_VENV:-$HOME/.cache/toffee/loaders-venv}"
req="$here/requirements.txt"

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

if [[ -n "${TOFFEE:-}" ]]; then
    toffee="$TOFFEE"
elif command -v toffee >/dev/null 2>&1; then
    toffee="$(command -v toffee)"
else
    toffee="$repo/target/debug/toffee"
fi
if [[ ! -x "$toffee" ]]; then
    echo "check.sh: no toffee binary at $toffee (build it with cargo build, or set TOFFEE)" >&2
    exit 2
fi

# --- the Python environment (reused while requirements.txt is unchanged)
t=$(now)
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$req" | cut -d' ' -f1)"
if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "venv: reusing $venv"
else
    echo "venv: installing $req into $venv"
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    "${PYTHON:-python3}" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$req"
    echo "$want" >"$stamp"
fi
echo "time: venv $(since "$t")s"

# --- the demo: 9 records over 5 shards of 2, thresholds set so that the built-in tiny models keep
# some records and reject others (an all-rejected shard included), half of them through the view
# generator
work="$(mktemp -d "${TMPDIR:-/tmp}/toffee-loaders.XXXXXX")"
if [[ "${KEEP:-0}" == 1 ]]; then
    echo "demo folders kept in $work"
else
    trap 'rm -rf "$work"' EXIT
fi
cat >"$work/pairs.toml" <<'EOF'
[draft]
steps = 2
[refine]
steps = 2
[view]
probability = 0.5
steps = 2
[filter]
dino = 0.1
clip_i = 0.0
clip_t = -1.0
[job]
resolution = 64
prompts_per_subject = 3
shard_size = 2
batch = 2
EOF

status=0
for variant in kept keep-rejected; do
    out="$work/$variant"
    args=(pairs --config "$work/pairs.toml" --out "$out")
    [[ "$variant" == keep-rejected ]] && args+=(--keep-rejected)
    t=$(now)
    if ! "$toffee" "${args[@]}"; then
        echo "FAIL toffee ${args[*]}" >&2
        exit 1
    fi
    echo "time: toffee pairs ($variant) $(since "$t")s"
    t=$(now)
    echo "== $variant: $out"
    if ! HF_DATASETS_DISABLE_PROGRESS_BARS=1 "$venv/bin/python" "$here/check_dataset.py" "$out"; then
        status=1
    fi
    echo "time: checks ($variant) $(since "$t")s"
done
if [[ $status == 0 ]]; then
    echo "check.sh: PASS (both folders load with webdataset, datasets and pyarrow)"
else
    echo "check.sh: FAIL (see the FAIL lines above)"
fi
exit $status
