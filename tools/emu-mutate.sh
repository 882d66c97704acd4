#!/usr/bin/env bash
# The mutation check of the software GPU (issue 23): plants classic kernel bugs one at a time and
# shows that the kernel tests on the software GPU fail on each, in at least one of the four shim
# modes. Prints one line per mutation and mode; exits 1 if any mutation
# survives every mode. Slow (a rebuild per mutation): run by hand, results go in docs/perf.md.
#
#   tools/emu-mutate.sh            # all mutations
#   tools/emu-mutate.sh 3 5        # only mutations 3 and 5
#
# Each mutation is planted in this tree's kernel file and taken out again (also on Ctrl-C or an
# error), so only the software GPU's kernels and toffee itself rebuild; do not edit kernels/ while
# it runs.
set -euo pipefail
cd "$(dirname "$0")/.."

# name | file | text to find | replacement (first occurrence)
mutations=(
  "cp.async wait count (wait<2> for wait<1>)|kernels/flash_tc.cu|cp_async_wait<1>();  // tile j landed|cp_async_wait<2>();  // tile j landed"
  "missing barrier after the Q fragments|kernels/flash_tc.cu|__syncthreads();  // everyone has read Q before tile 1 overwrites buffer 1|// (barrier removed)"
  "padding columns not zeroed|kernels/flash_tc.cu|sm[r * PITCH + c] = from_f<T>(0.0f);|(void)r, (void)c;"
  "wrong ldmatrix lane address (K fragments)|kernels/flash_tc.cu|((lane >> 3) & 1) * 8));|((lane >> 4) & 1) * 8));"
  "key tail off by one (key > lk)|kernels/flash_tc.cu|(key >= lk|(key > lk"
  "wrong GroupNorm merge (Chan's term without n_a)|kernels/norm_fast.cu|a.m2 += b.m2 + d * d * a.n * wb;|a.m2 += b.m2 + d * d * wb;"
  "missing cp.async wait in gemm_geglu|kernels/gemm_geglu.cu|        cp_async_wait<0>();|        // (wait removed)"
)
modes=("issue inorder" "wait inorder" "issue skew:1" "wait skew:2")
# The kernel suite's tuned-and-reference test: every kernel family against the CPU backend, odd
# sizes and tails included (flash attention at every head dim, GEGLU, GroupNorm, LayerNorm).
tests=(tuned_and_reference_kernels_match_the_cpu_backend)

pick=("$@")
survived=0
for i in "${!mutations[@]}"; do
  n=$((i + 1))
  if [ ${#pick[@]} -gt 0 ] && [[ ! " ${pick[*]} " =~ " $n " ]]; then continue; fi
  IFS='|' read -r name file old new <<<"${mutations[$i]}"
  cp "$file" "$file.unmutated"
  trap 'mv "$file.unmutated" "$file"' EXIT
  python3 - "$file" "$old" "$new" <<'PY'
import sys
path, old, new = sys.argv[1:]
s = open(path).read()
assert s.count(old) >= 1, f"mutation target not found in {path}: {old!r}"
open(path, "w").write(s.replace(old, new, 1))
PY
  echo "[$n] $name ($file)"
  cargo test -q --features emu --test gpu --no-run 2>/dev/null || echo "  does not compile"
  caught=0
  for m in "${modes[@]}"; do
    read -r cp sched <<<"$m"
    if TOFFEE_EMU_CPASYNC=$cp TOFFEE_EMU_SCHEDULE=$sched \
        timeout 600 cargo test -q --features emu --test gpu -- "${tests[@]}" >/tmp/toffee-mutate-$n.log 2>&1; then
      echo "  cp.async at $cp, $sched: passed (not caught)"
    else
      caught=1
      why=$(grep -m1 -E "^FAIL |emu|panicked" /tmp/toffee-mutate-$n.log | cut -c1-150 || true)
      echo "  cp.async at $cp, $sched: FAILED — ${why:-see /tmp/toffee-mutate-$n.log}"
    fi
  done
  [ $caught = 1 ] || survived=1
  mv "$file.unmutated" "$file"
  trap - EXIT
done
exit $survived
