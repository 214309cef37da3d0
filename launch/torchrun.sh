#!/usr/bin/env bash
# Multi-node training with `torchrun` and c10d rendezvous: no ssh, no hostfile. Run the same
# command on every node; the node that hosts the rendezvous endpoint is node 0.
#
#   launch/torchrun.sh --nnodes 2 --rdzv-endpoint node0:29400 [--node-rank N] \
#       [--nproc-per-node 8] [--local-addr THIS_NODE_IP] [--rdzv-id JOB] -- --config configs/1b5.yaml
#   with --hosts h0,h1,...  the endpoint defaults to h0:$RDZV_PORT and node N's address to hN
#   print each node's command instead of running: DRY_RUN=1 or --dry-run
#
# c10d assigns node ranks as nodes join; --node-rank N picks node N's address from --hosts and
# which node hosts the rendezvous store (node 0 with --local-addr equal to the endpoint's host:
# is_host=1; any other rank: is_host=0). --local-addr pins the address this node advertises
# (needed on multi-homed hosts). Arguments after `--` go to `python -m train`.
# Environment: launch/env.sh.
set -euo pipefail
# shellcheck source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

usage() { sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

gpu_count() {
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L 2>/dev/null | grep -c '^GPU' || echo 1
  else echo 1; fi
}

nnodes="${NNODES:-}"
nproc="${NPROC_PER_NODE:-}"
node_rank="${NODE_RANK:-}"
endpoint="${RDZV_ENDPOINT:-}"
local_addr="${LOCAL_ADDR:-}"
rdzv_id="${RDZV_ID:-${SLURM_JOB_ID:-rwkv}}"
max_restarts="${MAX_RESTARTS:-0}"
hosts_csv=""
train_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nnodes) nnodes="$2"; shift 2 ;;
    --nproc-per-node|--nproc_per_node) nproc="$2"; shift 2 ;;
    --node-rank|--node_rank) node_rank="$2"; shift 2 ;;
    --rdzv-endpoint|--rdzv_endpoint) endpoint="$2"; shift 2 ;;
    --local-addr|--local_addr) local_addr="$2"; shift 2 ;;
    --rdzv-id|--rdzv_id) rdzv_id="$2"; shift 2 ;;
    --max-restarts|--max_restarts) max_restarts="$2"; shift 2 ;;
    --hosts) hosts_csv="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; train_args=("$@"); break ;;
    *) rwkv_die "torchrun.sh: unknown option '$1' (train arguments go after --)" ;;
  esac
done

hosts=()
if [ -n "$hosts_csv" ]; then IFS=',' read -r -a hosts <<<"$hosts_csv"; fi
: "${nnodes:=${#hosts[@]}}"
[[ "$nnodes" =~ ^[1-9][0-9]*$ ]] || rwkv_die "--nnodes: a positive node count is required"
if [ ${#hosts[@]} -gt 0 ] && [ ${#hosts[@]} -ne "$nnodes" ]; then
  rwkv_die "--hosts lists ${#hosts[@]} hosts but --nnodes is $nnodes"
fi
: "${nproc:=$(gpu_count)}"
rwkv_share_cores "$nproc"
if [ -z "$endpoint" ] && [ ${#hosts[@]} -gt 0 ]; then endpoint="${hosts[0]}"; fi
[ -n "$endpoint" ] || rwkv_die "--rdzv-endpoint HOST[:PORT] is required (the host of node 0)"
[[ "$endpoint" == *:* ]] || endpoint="$endpoint:$RDZV_PORT"
if [ -n "$node_rank" ]; then
  [[ "$node_rank" =~ ^[0-9]+$ ]] && [ "$node_rank" -lt "$nnodes" ] ||
    rwkv_die "--node-rank $node_rank: must be 0..$((nnodes - 1))"
fi

node_cmd() {  # the torchrun command line of node $1 (may be empty), advertising address $2
  local rank="$1" addr="$2"
  local cmd=("${TORCHRUN:-torchrun}" --nnodes "$nnodes" --nproc_per_node "$nproc"
    --rdzv_backend c10d --rdzv_endpoint "$endpoint" --rdzv_id "$rdzv_id" --max_restarts "$max_restarts")
  if [ -n "$rank" ]; then cmd+=(--node_rank "$rank"); fi
  if [ -n "$addr" ]; then cmd+=(--local_addr "$addr"); fi
  # The c10d store runs on node 0. Say so where auto-detection cannot tell: node 0's endpoint may
  # be the address of a secondary interface, and another node on the same host (or one whose
  # endpoint resolves locally) must not race node 0 for the port.
  if [ "$rank" = 0 ] && [ -n "$addr" ] && [ "$addr" = "${endpoint%:*}" ]; then
    cmd+=(--rdzv_conf is_host=1)
  elif [ -n "$rank" ] && [ "$rank" != 0 ]; then
    cmd+=(--rdzv_conf is_host=0)
  fi
  cmd+=(-m train "${train_args[@]}")
  printf '%s\n' "${cmd[@]}"
}

rwkv_print_env
if rwkv_dry_run && [ -z "$node_rank" ]; then
  for ((i = 0; i < nnodes; i++)); do
    addr="${hosts[$i]:-}"
    mapfile -t cmd < <(node_cmd "$i" "$addr")
    rwkv_node_cmd "$i" "${addr:--}" "${cmd[@]}"
  done
else
  if [ -z "$local_addr" ] && [ -n "$node_rank" ] && [ ${#hosts[@]} -gt 0 ]; then
    local_addr="${hosts[$node_rank]}"
  fi
  mapfile -t cmd < <(node_cmd "$node_rank" "$local_addr")
  rwkv_node_cmd "${node_rank:-auto}" "${local_addr:-$(hostname)}" "${cmd[@]}"
fi
