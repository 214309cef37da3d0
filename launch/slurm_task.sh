#!/usr/bin/env bash
# One SLURM task = one training process (one GPU). `srun` starts this on every task of the job
# (see slurm.sbatch); it maps SLURM's task numbering onto the variables torch.distributed reads
# and starts the trainer. MASTER_ADDR / MASTER_PORT come from the sbatch script.
set -euo pipefail
# This is the node that runs the rank: env.sh works out the node's GPU arch and extensions dir here.
unset RWKV_NODE_ENV
# shellcheck source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

for v in SLURM_PROCID SLURM_NTASKS SLURM_LOCALID MASTER_ADDR; do
  [ -n "${!v:-}" ] || rwkv_die "slurm_task.sh: \$$v is not set (start it through srun from slurm.sbatch)"
done
export RANK="$SLURM_PROCID" WORLD_SIZE="$SLURM_NTASKS" LOCAL_RANK="$SLURM_LOCALID"
tasks_per_node="${SLURM_TASKS_PER_NODE:-1}"  # e.g. "8(x4)": 8 tasks on each of 4 nodes
export LOCAL_WORLD_SIZE="${SLURM_NTASKS_PER_NODE:-${tasks_per_node%%(*}}"
export MASTER_PORT
exec "$PYTHON" -m train "$@"
