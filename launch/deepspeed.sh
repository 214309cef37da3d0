#!/usr/bin/env bash
# Multi-node training with the `deepspeed` launcher and a hostfile.
#
#   ssh form (run once, on the first host; it starts every node over passwordless ssh):
#     launch/deepspeed.sh --hostfile launch/hostfile -- --config configs/1b5.yaml
#   no-ssh form (run on every node, each with its own rank):
#     launch/deepspeed.sh --hostfile H --no-ssh --node-rank N --master-addr A -- --config ...
#   print each node's command instead of running: DRY_RUN=1 or --dry-run
#
# Arguments after `--` go to `python -m train`. Environment: launch/env.sh.
set -euo pipefail
# shellcheck source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

usage() { sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

hostfile="${HOSTFILE:-$RWKV_LAUNCH_DIR/hostfile}"
master_addr="${MASTER_ADDR:-}"
master_port="$MASTER_PORT"
no_ssh=0
node_rank="${NODE_RANK:-}"
train_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --hostfile) hostfile="$2"; shift 2 ;;
    --master-addr|--master_addr) master_addr="$2"; shift 2 ;;
    --master-port|--master_port) master_port="$2"; shift 2 ;;
    --no-ssh|--no_ssh) no_ssh=1; shift ;;
    --node-rank|--node_rank) node_rank="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; train_args=("$@"); break ;;
    *) rwkv_die "deepspeed.sh: unknown option '$1' (train arguments go after --)" ;;
  esac
done

[ -f "$hostfile" ] || rwkv_die "hostfile '$hostfile' not found (format: launch/hostfile.example)"

# Parse the hostfile the way the deepspeed launcher does, so errors show up before any launch.
hosts=()
slots=()
lineno=0
while IFS= read -r line || [ -n "$line" ]; do
  lineno=$((lineno + 1))
  line="${line%%#*}"
  line="$(echo "$line" | xargs)"
  [ -z "$line" ] && continue
  if [[ "$line" =~ ^([^[:space:]]+)[[:space:]]+slots=([0-9]+)$ ]]; then
    for h in "${hosts[@]}"; do
      [ "$h" = "${BASH_REMATCH[1]}" ] && rwkv_die "$hostfile:$lineno: host '$h' listed twice"
    done
    hosts+=("${BASH_REMATCH[1]}")
    slots+=("${BASH_REMATCH[2]}")
  else
    rwkv_die "$hostfile:$lineno: expected 'HOSTNAME slots=N', got '$line'"
  fi
done <"$hostfile"
[ ${#hosts[@]} -gt 0 ] || rwkv_die "$hostfile: no hosts listed"
: "${master_addr:=${hosts[0]}}"
# This node's ranks: its own hostfile line with --node-rank, else the first host's (the ssh form
# sends the launching node's environment to every node).
this_node=0
if [[ "$node_rank" =~ ^[0-9]+$ ]] && [ "$node_rank" -lt ${#hosts[@]} ]; then this_node="$node_rank"; fi
rwkv_share_cores "${slots[$this_node]}"

launcher_cmd() {  # the deepspeed command line; $1 = node rank for the no-ssh form, or empty
  local cmd=("${DEEPSPEED:-deepspeed}" --hostfile "$hostfile" --master_addr "$master_addr" --master_port "$master_port")
  if [ -n "$1" ]; then cmd+=(--no_ssh --node_rank "$1"); fi
  cmd+=(--module train "${train_args[@]}")
  printf '%s\n' "${cmd[@]}"
}

rwkv_print_env
if [ "$no_ssh" = 1 ]; then
  if [ -n "$node_rank" ]; then
    [[ "$node_rank" =~ ^[0-9]+$ ]] && [ "$node_rank" -lt ${#hosts[@]} ] ||
      rwkv_die "--node-rank $node_rank: must be 0..$(( ${#hosts[@]} - 1 )) for the ${#hosts[@]} hosts of $hostfile"
    mapfile -t cmd < <(launcher_cmd "$node_rank")
    rwkv_node_cmd "$node_rank" "${hosts[$node_rank]}" "${cmd[@]}"
  elif rwkv_dry_run; then
    for i in "${!hosts[@]}"; do
      mapfile -t cmd < <(launcher_cmd "$i")
      rwkv_node_cmd "$i" "${hosts[$i]}" "${cmd[@]}"
    done
  else
    rwkv_die "--no-ssh needs --node-rank N (this node's line in $hostfile, from 0)"
  fi
else
  # The ssh runner forwards only a few variable prefixes by itself: write the rest to its env file.
  mapfile -t cmd < <(launcher_cmd "")
  if rwkv_dry_run; then
    printf 'launcher host=%s:' "$(hostname)"
    printf ' %q' "${cmd[@]}"
    printf '\n# what each node runs (the same as the --no-ssh form, started for you over ssh):\n'
    for i in "${!hosts[@]}"; do
      mapfile -t node < <(launcher_cmd "$i")
      rwkv_node_cmd "$i" "${hosts[$i]}" "${node[@]}"
    done
  else
    env_file="${DS_ENV_FILE:-$(mktemp "${TMPDIR:-/tmp}/rwkv-deepspeed-env.XXXXXX")}"
    rwkv_write_ds_env_file "$env_file"
    echo "[launch] ${#hosts[@]} nodes from $hostfile, master $master_addr:$master_port" >&2
    exec "${cmd[@]}"
  fi
fi
