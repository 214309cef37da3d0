# shellcheck shell=bash
# Common environment for every launch script (deepspeed.sh, torchrun.sh, slurm.sbatch).
# Sourced, never executed. A value already set by the caller always wins: these are defaults.
#
# Also defines the helpers the scripts share: rwkv_forwarded_env (the KEY=VALUE pairs that
# must reach every node), rwkv_write_ds_env_file (the same for the deepspeed launcher's ssh
# runner) and rwkv_node_cmd (run a node's command, or print it when DRY_RUN=1).

RWKV_LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RWKV_REPO_DIR="$(cd "$RWKV_LAUNCH_DIR/.." && pwd)"
export RWKV_LAUNCH_DIR RWKV_REPO_DIR

# The trainer is `python -m train`; run it from the repository so the package is importable
# even where it was not pip-installed (a cluster's shared checkout).
export PYTHONPATH="$RWKV_REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"
: "${PYTHON:=python}"

# --- threads: torch would start one OpenMP thread per core in every rank and oversubscribe; one
# thread a rank starves DeepSpeedCPUAdam (train.offload_optimizer), whose step is an OpenMP loop
# over the optimizer state. So each rank gets its share of the node's cores: under SLURM the
# task's own (SLURM_CPUS_PER_TASK); torchrun.sh / deepspeed.sh call rwkv_share_cores RANKS once
# they know the ranks per node. Until then (and for anything else sourcing this) 1.
RWKV_OMP_GIVEN="${OMP_NUM_THREADS:+1}"
: "${OMP_NUM_THREADS:=${SLURM_CPUS_PER_TASK:-1}}"
export OMP_NUM_THREADS
rwkv_share_cores() {  # rwkv_share_cores RANKS_ON_THIS_NODE: OMP_NUM_THREADS = cores / ranks (>= 1)
  if [ -n "$RWKV_OMP_GIVEN" ] || [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then return 0; fi
  local cores
  cores="$(nproc 2>/dev/null || echo 1)"
  if [[ "$1" =~ ^[1-9][0-9]*$ ]] && [ "$cores" -gt "$1" ]; then
    export OMP_NUM_THREADS=$((cores / $1))
  fi
}

# --- accelerator: empty lets DeepSpeed detect it (cuda on GPU nodes); `cpu` for CPU-only runs.
if [ -n "${DS_ACCELERATOR:-}" ]; then export DS_ACCELERATOR; fi

# --- JIT builds: which GPU they target, and where they go. These depend on the node, so they are
# worked out on the node that runs the ranks: slurm.sbatch (which runs on the first node only, and
# whose environment srun copies to every task) sets RWKV_NODE_ENV=defer and slurm_task.sh does it.
#
# TORCH_CUDA_ARCH_LIST: the compute capabilities of this node's GPUs (nvidia-smi), e.g. "9.0", so the
# WKV kernel and DeepSpeed's ops are built for the GPU they run on, not for every arch torch knows.
# The default extensions dir gets the arch as a suffix (…/torch_extensions/sm90): on a shared
# filesystem, nodes of two GPU types then build into two dirs instead of racing on one build
# and loading a kernel compiled for the other GPU. A value set by the caller wins for both.
rwkv_cuda_arch() {  # "8.0" / "8.0;9.0" from nvidia-smi, or nothing (no GPU, or a driver too old)
  command -v nvidia-smi >/dev/null 2>&1 || return 0
  nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null |
    tr -d ' \r' | grep -E '^[0-9]+\.[0-9]+$' | sort -u | paste -sd';' - || true
}
rwkv_node_env() {
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    local arch
    arch="$(rwkv_cuda_arch)"
    if [ -n "$arch" ]; then export TORCH_CUDA_ARCH_LIST="$arch"; fi
  fi
  if [ -z "${TORCH_EXTENSIONS_DIR:-}" ]; then
    local suffix="${TORCH_CUDA_ARCH_LIST:+/sm${TORCH_CUDA_ARCH_LIST//[^0-9A-Za-z]/}}"  # "8.0 9.0+PTX" -> sm8090PTX
    export TORCH_EXTENSIONS_DIR="$HOME/.cache/torch_extensions$suffix"
  fi
  # Triton's cache misbehaves on NFS; keep it node-local.
  : "${TRITON_CACHE_DIR:=${TMPDIR:-/tmp}/triton-cache-${USER:-$(id -un)}}"
  export TRITON_CACHE_DIR
}
if [ "${RWKV_NODE_ENV:-}" != "defer" ]; then rwkv_node_env; fi

# --- NCCL. Only defaults that are safe everywhere; cluster-specific ones (NCCL_IB_HCA,
# NCCL_IB_GID_INDEX, NCCL_SOCKET_IFNAME, NCCL_IB_DISABLE, ...) are passed through as set.
: "${NCCL_DEBUG:=WARN}"
# A rank whose peer died raises instead of hanging in a collective until the timeout.
: "${TORCH_NCCL_ASYNC_ERROR_HANDLING:=1}"
export NCCL_DEBUG TORCH_NCCL_ASYNC_ERROR_HANDLING
# DEEPSPEED_TIMEOUT (minutes, DeepSpeed's default 10): how long a collective waits for a peer that
# vanished without closing its connections (a frozen node, a partition) before the rank fails.
# A crashed process closes them, and its peers fail within seconds anyway.

# --- rendezvous defaults
: "${MASTER_PORT:=29500}"
: "${RDZV_PORT:=29400}"

# Variables every rank on every node must see. Prefix patterns end in `_`.
RWKV_FORWARDED_VARS=(
  NCCL_ TORCH_NCCL_ GLOO_SOCKET_IFNAME TP_SOCKET_IFNAME UCX_ CUDA_DEVICE_MAX_CONNECTIONS
  DEEPSPEED_TIMEOUT OMP_NUM_THREADS DS_ACCELERATOR TORCH_EXTENSIONS_DIR TORCH_CUDA_ARCH_LIST TRITON_CACHE_DIR
  PYTHONPATH
  HF_HOME WANDB_
)

# Print KEY=VALUE for every forwarded variable that is set, one a line, sorted.
rwkv_forwarded_env() {
  local name pattern
  while IFS= read -r name; do
    for pattern in "${RWKV_FORWARDED_VARS[@]}"; do
      if [[ "$pattern" == *_ && "$name" == "$pattern"* ]] || [[ "$name" == "$pattern" ]]; then
        printf '%s=%s\n' "$name" "${!name}"
        break
      fi
    done
  done < <(compgen -e | sort)
}

# The deepspeed launcher's ssh runner forwards only a few prefixes by itself; everything else
# must be listed in its env file (DS_ENV_FILE; an absolute path is honoured).
rwkv_write_ds_env_file() {
  local file="$1"
  rwkv_forwarded_env >"$file"
  export DS_ENV_FILE="$file"
}

# True when dry-run was asked for, by DRY_RUN=1 or a --dry-run flag (scripts set DRY_RUN).
rwkv_dry_run() { [ "${DRY_RUN:-0}" != "0" ] && [ -n "${DRY_RUN:-}" ]; }

# rwkv_node_cmd RANK HOST CMD...: exec CMD for this node, or in dry-run print one line
#   node_rank=RANK host=HOST: CMD (shell-quoted)
# which is the line a user would paste on HOST (and what the tests parse).
rwkv_node_cmd() {
  local rank="$1" host="$2"
  shift 2
  if rwkv_dry_run; then
    printf 'node_rank=%s host=%s:' "$rank" "$host"
    printf ' %q' "$@"
    printf '\n'
  else
    echo "[launch] node_rank=$rank host=$host: $*" >&2
    exec "$@"  # the launcher's exit status is the script's; no shell left waiting
  fi
}

# Print the environment every node gets (dry-run only), as `env: KEY=VALUE` lines.
rwkv_print_env() {
  if rwkv_dry_run; then
    rwkv_forwarded_env | sed 's/^/env: /'
  fi
}

rwkv_die() {
  echo "error: $*" >&2
  exit 2
}
