#!/bin/bash
# Submit a training job with sbatch options and Hydra overrides; prints the job id.
#
#   launch/slurm/submit.sh [--entry launch/<stage>.py] [--nodes N] [--gpus-per-node G]
#       [--nproc-per-node P] [--time T] [--partition P] [--account A] [--qos Q] [--logs DIR]
#       [--dry-run] [--] [overrides...]
#
#   launch/slurm/submit.sh --nodes 4 -- model=qwen2_7b parallel=qwen2_7b_8gpu \
#       train=qwen2_7b_cpt data=pretrain_medical init_from=ckpt/qwen2-7b-mcore run_name=cpt-7b
#
# Without --entry it submits launch/slurm/pretrain.sbatch; with it, launch/slurm/train.sbatch
# running that entry point.
# --gpus-per-node 0 submits a CPU job (device=cpu runs, e.g. a CPU-emulated smoke test); then
# --nproc-per-node sets the processes per node.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
nodes=1 gpus=8 nproc="" time_limit="04:00:00" logs="$root/logs" dry=0 entry=""
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --entry) entry="$2"; shift 2 ;;
        --nodes) nodes="$2"; shift 2 ;;
        --gpus-per-node) gpus="$2"; shift 2 ;;
        --nproc-per-node) nproc="$2"; shift 2 ;;
        --time) time_limit="$2"; shift 2 ;;
        --partition|--account|--qos|--reservation|--constraint)
            extra+=("$1=$2"); shift 2 ;;
        --logs) logs="$2"; shift 2 ;;
        --dry-run) dry=1; shift ;;
        --) shift; break ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        -*) echo "submit.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) break ;;
    esac
done

script="$here/pretrain.sbatch" stage=pretrain
if [ -n "$entry" ]; then
    if [ ! -f "$root/$entry" ]; then
        echo "submit.sh: --entry $entry is not a file under $root (e.g. launch/pretrain.py)" >&2
        exit 2
    fi
    script="$here/train.sbatch" stage="$(basename "$entry" .py)"
    export ENTRY="$entry"
fi
run_name="$(printf '%s\n' "$@" | sed -n 's/^run_name=//p' | tail -n 1)"
args=(--nodes="$nodes" --time="$time_limit" --job-name="sfmed-${run_name:-$stage}"
      --output="$logs/%x-%j.out" "${extra[@]}")
if [ "$gpus" -gt 0 ]; then
    args+=(--gpus-per-node="$gpus")
fi
export SFMED_ROOT="$root"
export SFMED_NPROC_PER_NODE="${nproc:-$gpus}"
if [ "$SFMED_NPROC_PER_NODE" -lt 1 ]; then
    echo "submit.sh: --gpus-per-node 0 needs --nproc-per-node N" >&2
    exit 2
fi
mkdir -p "$logs"
if [ "$dry" = 1 ]; then
    echo ${entry:+ENTRY="$entry"} sbatch "${args[@]}" "$script" "$@"
    exit 0
fi
sbatch --parsable --export=ALL "${args[@]}" "$script" "$@"
