#!/usr/bin/env bash
# Multi-host training under SLURM: one JAX process per GPU (or per host), all
# started by srun; process 0 (the first task) coordinates and writes the
# workdir. See docs/multihost.md.
#
#   sbatch --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 \
#       experiments/cluster/slurm_train.sh launch.py \
#       --config=configs/ddpm.py:res=64 --workdir=/shared/workdirs/ddpm64
#
# The arguments are those of `python` (a script and its flags), run from the
# directory sbatch was called in (the repository root). One process per host
# instead: --ntasks-per-node=1; it then drives every GPU of its host.
# The workdir and data.data_dir must be on a file system all hosts share.
# Environment (optional): JAX_COORDINATOR_PORT (default: derived from the
# job id), PYTHON (default: python).
#
#SBATCH --job-name=medgen_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
# SIGTERM to every task 3 minutes before the time limit: all processes stop
# after the same step and checkpoint it; resubmit the same command to resume.
#SBATCH --signal=TERM@180
#SBATCH --output=%x-%j.out
set -euo pipefail

if [[ $# -eq 0 ]]; then
  echo "usage: sbatch $0 launch.py --config=... --workdir=..." >&2
  exit 2
fi
cd "${SLURM_SUBMIT_DIR:-.}"

# Process 0 runs on the allocation's first host and serves the coordinator
# there; the port is derived from the job id, so concurrent jobs sharing a
# host do not collide.
head_host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
port=${JAX_COORDINATOR_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export JAX_COORDINATOR_ADDRESS="$head_host:$port"
export JAX_NUM_PROCESSES="$SLURM_NTASKS"
export PYTHON="${PYTHON:-python}"
# Which GPUs a process drives: its own (one task per GPU), or all of its
# host's (one task per host). Unset on CPU-only and TPU hosts.
export MEDGEN_GPUS_ON_NODE="${SLURM_GPUS_ON_NODE:-0}"
export MEDGEN_TASKS_PER_NODE="${SLURM_NTASKS_PER_NODE:-1}"

# --kill-on-bad-exit: a process that fails takes the others down instead of
# leaving them waiting in their next collective.
srun --kill-on-bad-exit=1 bash -c '
  export JAX_PROCESS_ID="$SLURM_PROCID"
  if ((MEDGEN_GPUS_ON_NODE > 0)); then
    if ((MEDGEN_TASKS_PER_NODE == 1)); then
      export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((MEDGEN_GPUS_ON_NODE - 1)))
    else
      export JAX_LOCAL_DEVICE_IDS="$SLURM_LOCALID"
    fi
  fi
  exec "$PYTHON" "$@"' bash "$@"
