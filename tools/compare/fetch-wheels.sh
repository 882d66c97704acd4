#!/usr/bin/env bash
# Run HERE (a machine with PyPI access), from anywhere in the repository: downloads the Python
# wheels that tools/compare/run.sh needs on the GPU machine and that its image lacks, into .whl/
# at the repository root (ignored through .git/info/exclude; never commit wheels).
#
# The GPU image (KINDS.md) has python3 3.12, torch 2.11.0+cu130, transformers 5.17, safetensors
# 0.8.0, numpy, huggingface-hub 1.33.0, filelock, regex, requests, pillow and zipp, but not
# diffusers. diffusers 0.42.1's Requires-Dist (extras aside): importlib_metadata, filelock,
# huggingface-hub>=1.32.0,<3.0, numpy, regex, requests, safetensors>=0.8.0, Pillow. All are there
# except importlib_metadata, which is NOT carried: diffusers only imports that backport on
# Python < 3.8 (diffusers/utils/import_utils.py; 3.12 uses the stdlib importlib.metadata), and
# its current release needs lazy-importer, also missing there; a backport on PYTHONPATH would
# also be picked up by other packages that prefer it. anchor.py is tested with it blocked.
# The one wheel is pure Python, ~6.4 MB.
set -euo pipefail
ROOT="$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
cd "$ROOT"
GITDIR="$(git rev-parse --git-common-dir)"
mkdir -p "$GITDIR/info"
grep -qxF '/.whl/' "$GITDIR/info/exclude" 2>/dev/null || echo '/.whl/' >> "$GITDIR/info/exclude"

PY="${PYTHON:-python3}"
WHEELS=(diffusers==0.42.1)
mkdir -p .whl
# One version of each package: two stop the install there. Stale diffusers wheels are removed;
# anything else found in .whl/ is only reported (run.sh installs every .whl/*.whl).
for f in .whl/*.whl; do
    [ -e "$f" ] || continue
    case "$f" in
        .whl/diffusers-0.42.1-*) ;;
        .whl/diffusers-*) echo "removing stale $f"; rm -f "$f" ;;
        *) echo "note: $f is not needed by tools/compare; run.sh will install it too" ;;
    esac
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"

ls -l .whl
whl_kb=$(du -sk .whl | cut -f1)
dev_kb=$(du -sk build-device 2>/dev/null | cut -f1 || echo 0)
tree_kb=$(git ls-files -z --cached --others --exclude-standard | du -ck --files0-from=- 2>/dev/null | tail -n 1 | cut -f1)
total_kb=$((whl_kb + dev_kb + tree_kb))
echo ".whl: ${whl_kb} KiB, build-device: ${dev_kb} KiB, working tree: ${tree_kb} KiB; carried in all: $((total_kb / 1024)) MiB (limit 64 MiB)"
if [ "$total_kb" -ge $((64 * 1024)) ]; then
    echo "ERROR: the carried tree would exceed the device tool's 64 MiB limit" >&2
    exit 1
fi
