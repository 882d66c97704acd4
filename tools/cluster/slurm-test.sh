#!/usr/bin/env bash
# End-to-end test of deploy/slurm on a real, single-node Slurm (Debian's slurm-wlm) started here:
#
#   1. a reference run without Slurm: `toffee pairs --out REF` (one process, every shard);
#   2. a config naming a missing model folder is refused by submit.sh's `toffee pairs --check`
#      (exit 2, nothing queued); then the same run as a 3-task array through
#      deploy/slurm/submit.sh with TOFFEE_GPUS=0
#      (tasks one at a time: --array=0-2%1), with the merge as a dependent job;
#   3. task 1 is cancelled mid-run (scancel JOB_1): toffee gets SIGTERM, stops after the batch in
#      flight, the task ends CANCELLED and Slurm cancels the merge (its dependency can no longer
#      be met);
#   4. task 2 gets the time-limit warning by hand (scancel --batch --signal=USR1 JOB_2): the script
#      stops toffee and requeues the task, which resumes and completes (its log is appended to);
#   5. only id 1 is resubmitted through submit.sh (--ids 1, same N) with a new merge;
#   6. the merged folder must equal REF: the same shard files, every tar byte for byte and member
#      by member, the per-shard index files, index.jsonl (sorted and unsorted), job.json, and
#      stats.json except its timings.
#
# Needs root to install slurm-wlm and munge with apt-get when they are missing. Prints a line
# starting "skipped:" and exits 0 when Slurm cannot be installed or its daemons do not start here.
# Everything it starts (a private munged, slurmctld, slurmd) runs from a temporary folder with its
# own slurm.conf and is stopped at the end; nothing under /etc is written.
#
#   tools/cluster/slurm-test.sh                       # toffee from $TOFFEE, PATH or target/
#   TOFFEE=/path/to/toffee tools/cluster/slurm-test.sh
#   KEEP=1 tools/cluster/slurm-test.sh                # keep the work folder for a look
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
start_time=$(date +%s)
say() { echo "[slurm-test $(($(date +%s) - start_time))s] $*"; }
skip() { echo "skipped: $*"; exit 0; }
fail() { echo "FAIL: $*" >&2; exit 1; }

# --- toffee -------------------------------------------------------------------------------------
TOFFEE="${TOFFEE:-}"
if [[ -z "$TOFFEE" ]]; then
    for t in "$(command -v toffee || true)" "$repo/target/release/toffee" "$repo/target/debug/toffee"; do
        if [[ -n "$t" && -x "$t" ]]; then TOFFEE="$t"; break; fi
    done
fi
[[ -n "$TOFFEE" && -x "$TOFFEE" ]] || fail "no toffee binary: build it (cargo build) or set TOFFEE"
TOFFEE="$(cd "$(dirname "$TOFFEE")" && pwd)/$(basename "$TOFFEE")"

# --- Slurm and munge from Debian ----------------------------------------------------------------
need=(slurmctld slurmd sbatch squeue scontrol scancel sinfo munged munge jq)
missing() { local c; for c in "${need[@]}"; do command -v "$c" >/dev/null || [[ -x "/usr/sbin/$c" ]] || return 0; done; return 1; }
if missing; then
    if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null; then
        skip "slurm-wlm/munge are not installed and this is not root with apt-get"
    fi
    say "installing slurm-wlm and munge with apt-get"
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
           DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge jq; } >/tmp/slurm-test-apt.log 2>&1; then
        skip "apt-get could not install slurm-wlm and munge (see /tmp/slurm-test-apt.log)"
    fi
fi
export PATH="$PATH:/usr/sbin"
missing && skip "slurm-wlm is installed but some of ${need[*]} are missing"

# --- a private Slurm cluster in a temporary folder ----------------------------------------------
work="$(mktemp -d /tmp/toffee-slurm-test.XXXXXX)"
chmod 755 "$work"
pids=()
cleanup() {
    local rc=$?
    if [[ -n "${SLURM_CONF:-}" && -e "${SLURM_CONF}" ]]; then
        scancel --quiet --user="$(id -un)" 2>/dev/null || true
    fi
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    if [[ -e "$work/munged.pid" ]]; then pids+=("$(cat "$work/munged.pid")"); kill "${pids[-1]}" 2>/dev/null || true; fi
    # The daemons take a moment to shut down; then SIGKILL what is left.
    for _ in $(seq 50); do
        local alive=0
        for p in "${pids[@]}"; do if kill -0 "$p" 2>/dev/null; then alive=1; fi; done
        ((alive)) || break
        sleep 0.2
    done
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    if [[ "${KEEP:-0}" == 1 || $rc -ne 0 ]]; then echo "work folder kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

mkdir -p "$work"/{state,spool,log,run,logs}
host="$(hostname -s)"
cpus="$(nproc)"
port=$((17000 + RANDOM % 2000))

# munged with its own key and socket, so a system munged (or its absence) does not matter.
dd if=/dev/urandom of="$work/munge.key" bs=1024 count=1 status=none
chmod 600 "$work/munge.key"
if ! munged --force --socket="$work/munge.sock" --key-file="$work/munge.key" \
        --pid-file="$work/munged.pid" --log-file="$work/log/munged.log" --seed-file="$work/munge.seed" \
        >"$work/log/munged.out" 2>&1; then
    skip "munged does not start here: $(tail -n 3 "$work/log/munged.out" "$work/log/munged.log" 2>/dev/null | tr '\n' ' ')"
fi

# CPU-only, no gres, no cgroups (task/none, proctrack/linuxproc): what a container allows.
export SLURM_CONF="$work/slurm.conf"
cat >"$SLURM_CONF" <<EOF
ClusterName=toffeetest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$work/munge.sock,cred_expire=30
StateSaveLocation=$work/state
SlurmdSpoolDir=$work/spool
SlurmctldPidFile=$work/run/slurmctld.pid
SlurmdPidFile=$work/run/slurmd.pid
SlurmctldLogFile=$work/log/slurmctld.log
SlurmdLogFile=$work/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
KillWait=30
MinJobAge=3600
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=1000 State=UNKNOWN
PartitionName=test Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

say "starting slurmctld and slurmd (SLURM_CONF=$SLURM_CONF)"
slurmctld -D -f "$SLURM_CONF" >"$work/log/slurmctld.out" 2>&1 &
pids+=($!)
slurmd -D -f "$SLURM_CONF" >"$work/log/slurmd.out" 2>&1 &
pids+=($!)
up=0
for _ in $(seq 60); do
    if [[ "$(sinfo -h -o %T 2>/dev/null)" == idle ]]; then up=1; break; fi
    sleep 0.5
done
if ((up == 0)); then
    why="$(tail -n 4 "$work/log/slurmctld.out" "$work/log/slurmd.out" 2>/dev/null | grep -v '^$' | tr '\n' ' ')"
    skip "the Slurm daemons did not come up in 30 s here: ${why:0:600}"
fi
say "Slurm is up: $(sinfo -h -o '%P %D node %c CPUs %T')"

# --- the run ------------------------------------------------------------------------------------
# A small job: 3 subjects x 8 prompts = 24 records in 12 shards of 2, so each of 3 tasks builds 4
# shards, a few seconds each with the built-in tiny models. Rejected records are kept so the tars
# have members to compare.
cat >"$work/pairs.toml" <<'EOF'
[draft]
steps = 8
[refine]
steps = 8
[job]
resolution = 128
prompts_per_subject = 8
shard_size = 2
batch = 2
seed = 0
EOF
unset SLURM_JOB_ID SLURM_ARRAY_TASK_ID SLURM_ARRAY_TASK_MIN SLURM_ARRAY_TASK_COUNT JOB_COMPLETION_INDEX TOFFEE_NUM_SHARDS

say "reference run, unsharded"
"$TOFFEE" pairs --config "$work/pairs.toml" --keep-rejected --out "$work/ref" >"$work/log/ref.out" 2>&1 ||
    fail "the reference run failed: $(tail -n 5 "$work/log/ref.out")"
say "reference: $(tail -n 1 "$work/log/ref.out")"

export TOFFEE TOFFEE_OUT="$work/out" TOFFEE_CONFIG="$work/pairs.toml" TOFFEE_ARGS="--keep-rejected"
export TOFFEE_NUM_SHARDS=3 TOFFEE_GPUS=0 TOFFEE_CPUS=1 TOFFEE_MEM=100M TOFFEE_TIME=30:00
export TOFFEE_LOG_DIR="$work/logs"

job_state() { scontrol -o show job "$1" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | head -n 1 | cut -d= -f2; }
job_field() { scontrol -o show job "$1" 2>/dev/null | grep -o "$2=[^ ]*" | head -n 1 | cut -d= -f2-; }
# wait_until SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.2 s.
wait_until() {
    local limit=$1 what=$2 i; shift 2
    for ((i = 0; i < limit * 5; i++)); do
        if "$@"; then return 0; fi
        sleep 0.2
    done
    fail "waited ${limit}s for $what (squeue: $(squeue -h -o '%i %T %r' | tr '\n' ';'))"
}
is_state() { [[ "$(job_state "$1")" == "$2" ]]; }
is_done() { case "$(job_state "$1")" in COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY) return 0 ;; *) return 1 ;; esac; }
# committed_in SLICE: shards s with s mod 3 = SLICE that have their stats file.
committed_in() {
    local n=0 f s
    for f in "$TOFFEE_OUT"/pairs-*.stats.json; do
        [[ -e "$f" ]] || continue
        s="${f##*/pairs-}"; s="${s%.stats.json}"
        if ((10#$s % 3 == $1)); then n=$((n + 1)); fi
    done
    echo "$n"
}
has_committed() { (($(committed_in "$1") >= $2)); }

say "a config that cannot run is refused before anything is queued"
printf '[models]\ndraft = "/nonexistent/sd15"\n' >"$work/bad.toml"
set +e
TOFFEE_CONFIG="$work/bad.toml" "$repo/deploy/slurm/submit.sh" >"$work/submit0.out" 2>&1
rc=$?
set -e
cat "$work/submit0.out"
[[ $rc == 2 ]] || fail "submit.sh with a bad config exited $rc, not 2"
grep -q "nothing submitted" "$work/submit0.out" || fail "submit.sh did not say nothing was submitted"
[[ -z "$(squeue -h -o %i)" ]] || fail "submit.sh queued a job for a bad config"

say "submitting the 3-task array (one task at a time) and the merge"
TOFFEE_MAX_RUNNING=1 "$repo/deploy/slurm/submit.sh" >"$work/submit1.out"
cat "$work/submit1.out"
A="$(sed -n 's/^TOFFEE_ARRAY_JOB=//p' "$work/submit1.out")"
M="$(sed -n 's/^TOFFEE_MERGE_JOB=//p' "$work/submit1.out")"
[[ -n "$A" && -n "$M" ]] || fail "submit.sh did not print the job ids"

# Task 1: cancel it mid-run, once it has committed a shard (so the cancel lands between or during
# batches and must leave the committed shards intact).
wait_until 120 "task ${A}_1 to run and commit a shard" has_committed 1 1
scancel "${A}_1"
say "cancelled ${A}_1 with $(committed_in 1) of its 4 shards committed"
wait_until 60 "task ${A}_1 to end" is_done "${A}_1"
[[ "$(job_state "${A}_1")" == CANCELLED ]] || fail "task ${A}_1 is $(job_state "${A}_1"), not CANCELLED"
cancelled_with=$(committed_in 1)
((cancelled_with < 4)) || fail "task ${A}_1 finished all its shards before the cancel took effect"
grep -q 'toffee exited with 3' "$work/logs/pairs-${A}_1.out" ||
    fail "toffee in ${A}_1 did not exit 3 after SIGTERM: $(cat "$work/logs/pairs-${A}_1.out")"
say "task ${A}_1: CANCELLED, toffee exited 3, $cancelled_with shard(s) committed"

# Task 2: the time-limit warning by hand; the script must stop toffee and requeue the task.
wait_until 120 "task ${A}_2 to run and commit a shard" has_committed 2 1
scancel --batch --signal=USR1 "${A}_2"
say "sent SIGUSR1 (the time-limit warning) to ${A}_2 with $(committed_in 2) of its 4 shards committed"
wait_until 180 "task ${A}_2 to be requeued and complete" is_state "${A}_2" COMPLETED
restarts="$(job_field "${A}_2" Restarts)"
log2="$work/logs/pairs-${A}_2.out"
((restarts >= 1)) || fail "task ${A}_2 completed without a requeue (Restarts=$restarts): $(cat "$log2")"
grep -q 'requeueing this task' "$log2" || fail "no requeue in $log2"
(($(grep -c 'shard index 2 of 3' "$log2") >= 2)) || fail "$log2 was not appended to on requeue"
say "task ${A}_2: stopped, requeued (Restarts=$restarts), resumed and COMPLETED; its log holds both runs"

is_state "${A}_0" COMPLETED || fail "task ${A}_0 is $(job_state "${A}_0")"
wait_until 60 "merge $M to be cancelled (a task it depends on was cancelled)" is_done "$M"
[[ "$(job_state "$M")" == CANCELLED ]] || fail "merge $M is $(job_state "$M"), not CANCELLED"
say "merge $M: CANCELLED by Slurm ($(job_field "$M" Reason))"
if "$TOFFEE" pairs merge "$TOFFEE_OUT" >"$work/log/early-merge.out" 2>&1; then
    fail "toffee pairs merge accepted a run with task 1 unfinished"
fi
say "merge by hand before the resubmission fails as it should: $(tail -n 1 "$work/log/early-merge.out")"

say "resubmitting only id 1 (same N=3) with a new merge"
"$repo/deploy/slurm/submit.sh" --ids 1 >"$work/submit2.out"
cat "$work/submit2.out"
A2="$(sed -n 's/^TOFFEE_ARRAY_JOB=//p' "$work/submit2.out")"
M2="$(sed -n 's/^TOFFEE_MERGE_JOB=//p' "$work/submit2.out")"
wait_until 180 "merge $M2 to end" is_done "$M2"
is_state "${A2}_1" COMPLETED || fail "resubmitted task ${A2}_1 is $(job_state "${A2}_1"): $(cat "$work/logs/pairs-${A2}_1.out")"
is_state "$M2" COMPLETED || fail "merge $M2 is $(job_state "$M2"): $(cat "$work/logs/pairs-merge-$M2.out")"
say "task ${A2}_1 and merge $M2: COMPLETED ($(grep -m1 'shard(s) built' "$work/logs/pairs-${A2}_1.out"))"

# --- compare with the reference -----------------------------------------------------------------
say "comparing $TOFFEE_OUT with the reference"
(cd "$work/ref" && ls pairs-* job.json index.jsonl stats.json) >"$work/ref.files"
(cd "$TOFFEE_OUT" && ls pairs-* job.json index.jsonl stats.json) >"$work/out.files"
diff "$work/ref.files" "$work/out.files" || fail "the shard files differ"
ntar=0
members=0
for t in "$work"/ref/pairs-*.tar; do
    b="$(basename "$t")"
    mkdir -p "$work/x/ref/$b" "$work/x/out/$b"
    tar -xf "$t" -C "$work/x/ref/$b"
    tar -xf "$TOFFEE_OUT/$b" -C "$work/x/out/$b"
    diff <(tar -tf "$t") <(tar -tf "$TOFFEE_OUT/$b") || fail "$b: the member lists differ"
    diff -r "$work/x/ref/$b" "$work/x/out/$b" || fail "$b: member contents differ"
    cmp "$t" "$TOFFEE_OUT/$b" || fail "$b: the tar files differ byte for byte"
    ntar=$((ntar + 1))
    members=$((members + $(tar -tf "$t" | wc -l)))
done
for j in "$work"/ref/pairs-*.jsonl; do
    cmp "$j" "$TOFFEE_OUT/$(basename "$j")" || fail "$(basename "$j") differs"
done
diff <(sort "$work/ref/index.jsonl") <(sort "$TOFFEE_OUT/index.jsonl") || fail "index.jsonl: the records differ"
if cmp -s "$work/ref/index.jsonl" "$TOFFEE_OUT/index.jsonl"; then order="in the same order"; else order="same records, another order"; fi
cmp "$work/ref/job.json" "$TOFFEE_OUT/job.json" || fail "job.json differs"
cmp "$work/ref/README.md" "$TOFFEE_OUT/README.md" || fail "the dataset card README.md differs"
untimed() { jq -S 'del(.stage_seconds, .seconds, .work_seconds, .pairs_per_hour, .started, .finished)' "$1"; }
diff <(untimed "$work/ref/stats.json") <(untimed "$TOFFEE_OUT/stats.json") || fail "stats.json differs (timings aside)"

say "PASS: $ntar shards ($members tar members) identical byte for byte, $(wc -l <"$TOFFEE_OUT/index.jsonl") index records identical ($order), job.json and the dataset card identical, stats.json identical but for timings"
echo "pass: slurm-test in $(($(date +%s) - start_time)) s"
