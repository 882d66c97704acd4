#!/usr/bin/env bash
# Submit a toffee pairs run to Slurm: the array (pairs.sbatch, task i builds slice i of N) and the
# merge (merge.sbatch) as a job that starts when every task has exited 0.
#
#   TOFFEE_OUT=/shared/run1 TOFFEE_CONFIG=/shared/pairs.toml deploy/slurm/submit.sh
#   TOFFEE_OUT=/shared/run1 TOFFEE_CONFIG=/shared/pairs.toml TOFFEE_GPUS=0 deploy/slurm/submit.sh
#   # later, only the ids that failed or were cancelled, with the same N:
#   TOFFEE_OUT=/shared/run1 TOFFEE_CONFIG=/shared/pairs.toml deploy/slurm/submit.sh --ids 3,5
#
# Options:
#   --ids LIST      array task ids to submit (Slurm syntax: 0-7, 1,3, 0-3,6); default 0-(N-1).
#                   Every id must be below N: the id is the shard index, N the process count.
#   --after JOBID   also start the merge only after this job (e.g. the first array, when some of
#                   its tasks still run while you resubmit others); repeatable.
#   --no-merge      submit the array only.
#   anything else   passed to sbatch for the array (e.g. --partition=gpu --account=me).
#
# Environment (the defaults in brackets); N is set here and only here:
#   TOFFEE_NUM_SHARDS   N, the number of processes of the run [8]
#   TOFFEE_OUT          shared output folder [$PWD/pairs-out]
#   TOFFEE_CONFIG       pairs.toml [none: toffee's built-in tiny models]
#   TOFFEE_GPUS         GPUs per task [1]; 0 on a CPU-only cluster (no --gres at all)
#   TOFFEE_DEVICES      toffee --devices [cuda:0,…,cuda:(TOFFEE_GPUS-1), or cpu when TOFFEE_GPUS=0]
#   TOFFEE_CPUS         CPUs per task [8]
#   TOFFEE_MEM          memory per task [64G]; empty: the partition's default
#   TOFFEE_TIME         time limit per task [24:00:00]
#   TOFFEE_STOP_SECONDS SIGUSR1 this long before the time limit, to stop and requeue [300]
#   TOFFEE_MAX_RUNNING  at most this many tasks at once (the array's %K) [no limit]
#   TOFFEE_LOG_DIR      where pairs-<job>_<task>.out and pairs-merge-<job>.out go [$PWD]
#   TOFFEE_ARGS         more toffee arguments, split on spaces [none]
#   TOFFEE              the toffee binary as the nodes see it [toffee]
#   TOFFEE_SKIP_CHECK   1: submit without `toffee pairs --check` on this node first [0]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

N="${TOFFEE_NUM_SHARDS:-8}"
GPUS="${TOFFEE_GPUS:-1}"
if ! [[ "$N" =~ ^[1-9][0-9]*$ ]]; then echo "submit.sh: TOFFEE_NUM_SHARDS must be a positive integer, not '$N'" >&2; exit 2; fi
if ! [[ "$GPUS" =~ ^[0-9]+$ ]]; then echo "submit.sh: TOFFEE_GPUS must be 0 or more, not '$GPUS'" >&2; exit 2; fi

ids="0-$((N - 1))"
after=()
merge=1
sbatch_args=()
while (($#)); do
    case "$1" in
        --ids) ids="$2"; shift 2 ;;
        --ids=*) ids="${1#--ids=}"; shift ;;
        --after) after+=("$2"); shift 2 ;;
        --after=*) after+=("${1#--after=}"); shift ;;
        --no-merge) merge=0; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) sbatch_args+=("$1"); shift ;;
    esac
done

# Every id in the list must be a shard index below N.
IFS=, read -r -a items <<<"$ids"
for item in "${items[@]}"; do
    if ! [[ "$item" =~ ^([0-9]+)(-([0-9]+)(:[0-9]+)?)?$ ]]; then
        echo "submit.sh: --ids: '$item' is not an id or a range a-b" >&2; exit 2
    fi
    last="${BASH_REMATCH[3]:-${BASH_REMATCH[1]}}"
    if (( 10#$last >= N )); then
        echo "submit.sh: --ids: $item goes past $((N - 1)), the last task of N=$N" >&2; exit 2
    fi
done

if [[ -z "${TOFFEE_DEVICES:-}" ]]; then
    if (( GPUS > 0 )); then
        TOFFEE_DEVICES="cuda:0"
        for ((g = 1; g < GPUS; g++)); do TOFFEE_DEVICES+=",cuda:$g"; done
    else
        TOFFEE_DEVICES="cpu"
    fi
fi

OUT="${TOFFEE_OUT:-$PWD/pairs-out}"
LOGS="${TOFFEE_LOG_DIR:-$PWD}"
mkdir -p "$LOGS"

export TOFFEE_NUM_SHARDS="$N" TOFFEE_OUT="$OUT" TOFFEE_DEVICES
export TOFFEE_CONFIG="${TOFFEE_CONFIG:-}" TOFFEE_ARGS="${TOFFEE_ARGS:-}" TOFFEE="${TOFFEE:-toffee}"

# Check the run on this (login) node before anything queues: the config, the subjects, every model
# folder (built from the file headers: seconds, little memory) and the output folder. The devices
# are the nodes' business, so the check runs on the CPU. TOFFEE_SKIP_CHECK=1 skips it.
if [[ "${TOFFEE_SKIP_CHECK:-0}" != 1 ]]; then
    if command -v "$TOFFEE" >/dev/null 2>&1; then
        check=("$TOFFEE" pairs --check --out "$OUT" --devices cpu)
        [[ -n "$TOFFEE_CONFIG" ]] && check+=(--config "$TOFFEE_CONFIG")
        # shellcheck disable=SC2206  # TOFFEE_ARGS is split on spaces, as pairs.sbatch does
        check+=($TOFFEE_ARGS)
        if ! "${check[@]}" >/dev/null; then
            echo "submit.sh: the run would fail to start (above); nothing submitted" >&2
            exit 2
        fi
    else
        echo "submit.sh: warning: no $TOFFEE here, so the run was not checked before submitting" >&2
    fi
fi

array_opts=(
    --parsable
    --array="${ids}${TOFFEE_MAX_RUNNING:+%$TOFFEE_MAX_RUNNING}"
    --cpus-per-task="${TOFFEE_CPUS:-8}"
    --time="${TOFFEE_TIME:-24:00:00}"
    --signal="B:USR1@${TOFFEE_STOP_SECONDS:-300}"
    --output="$LOGS/pairs-%A_%a.out"
    --export=ALL
)
if [[ -n "${TOFFEE_MEM-64G}" ]]; then array_opts+=(--mem="${TOFFEE_MEM-64G}"); fi
if (( GPUS > 0 )); then array_opts+=(--gres="gpu:$GPUS"); fi

array_job="$(sbatch "${array_opts[@]}" "${sbatch_args[@]}" "$here/pairs.sbatch")"
array_job="${array_job%%;*}"  # --parsable prints "jobid[;cluster]"
echo "array job $array_job: ids $ids of N=$N, devices $TOFFEE_DEVICES, output $OUT"
echo "TOFFEE_ARRAY_JOB=$array_job"

if (( merge )); then
    dep="afterok:$array_job"
    for j in "${after[@]}"; do dep+=",afterany:$j"; done
    merge_job="$(sbatch --parsable --dependency="$dep" --kill-on-invalid-dep=yes \
        --cpus-per-task=1 --time="${TOFFEE_MERGE_TIME:-1:00:00}" \
        --output="$LOGS/pairs-merge-%j.out" --export=ALL "$here/merge.sbatch")"
    merge_job="${merge_job%%;*}"
    echo "merge job $merge_job: runs after $dep"
    echo "TOFFEE_MERGE_JOB=$merge_job"
fi
