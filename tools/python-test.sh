#!/usr/bin/env bash
# Builds the Python package (python/, PyO3 + maturin) in the dev profile with the shared target
# folder, installs it into a venv, and runs its tests (python/tests), which compare with the CLI
# (target/debug/toffee, built here too). Exit status: pytest's.
#
#   bash tools/python-test.sh [pytest arguments]
#
# Environment:
#   CARGO_TARGET_DIR     the cargo target folder (default: $repo/target)
#   TOFFEE_PY_VENV       the venv, made and reused here (default: $CARGO_TARGET_DIR/py-venv;
#                        rebuilt when python/requirements-test.txt changes)
#   PYTHON               the interpreter that makes the venv (default: python3, 3.9 or newer)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
venv="${TOFFEE_PY_VENV:-$CARGO_TARGET_DIR/py-venv}"
req="$repo/python/requirements-test.txt"

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# --- the venv (reused while the requirements are unchanged)
t=$(now)
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$req" | cut -d' ' -f1)"
if [[ ! -x "$venv/bin/python" || ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    rm -rf "$venv"
    "${PYTHON:-python3}" -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -r "$req"
    echo "$want" >"$stamp"
fi
echo "python-test: venv ready in $(since "$t") s ($venv)"

# --- the CLI the tests compare with, and the extension (one dev-profile build of the library).
# The CLI is built with the extension's package selected too: pyo3's proc macros enable more syn
# features, and a build without them would resolve the dependencies' features differently and
# compile the library (and everything using serde) a second time.
t=$(now)
cargo build -p toffee -p toffee-python --bin toffee
echo "python-test: toffee CLI built in $(since "$t") s"
t=$(now)
wheels="$CARGO_TARGET_DIR/py-wheels"
rm -rf "$wheels"
"$venv/bin/maturin" build --profile dev -m python/Cargo.toml -i "$venv/bin/python" --out "$wheels" -q
"$venv/bin/pip" install -q --disable-pip-version-check --no-deps --force-reinstall "$wheels"/*.whl
echo "python-test: extension built and installed in $(since "$t") s"

# --- the tests, run from outside the source tree so `import toffee` is the installed package
t=$(now)
status=0
(cd "$repo/python/tests" && TOFFEE="$CARGO_TARGET_DIR/debug/toffee" TOFFEE_REPO="$repo" \
    "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@") || status=$?
echo "python-test: pytest finished in $(since "$t") s (exit $status)"
exit "$status"
