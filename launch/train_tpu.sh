#!/usr/bin/env bash
# Start `python -m pacs_jax train` on every worker of a TPU VM (multi-controller JAX: each host runs
# the same program), detached from ssh, logging to ~/pacs_jax_run/train.log on each worker; then
# stream worker 0's log until training ends and exit with its status.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/train_tpu.sh --name NAME --config CFG [--zone ZONE] [--project PROJECT]
                           [--run-dir gs://BUCKET/runs/RUN] [--no-sync] [--detach]
                           [--stop-grace SECONDS] [--dry-run]
                           [--] [key=value ...]

  --config     training config, a path inside this repository (it is copied to the workers)
  --run-dir    sets trainer.run_dir; use gs://... so metrics and checkpoints outlive the VM
  --no-sync    do not copy the working tree to the workers first (setup_tpu.sh did)
  --detach     return once training has started instead of streaming worker 0's log
  --stop-grace a run already going on the VM is stopped first: SIGTERM, then this many seconds
               to finish its step and save before SIGKILL (default 600)
  --dry-run    print the gcloud commands (one per line, prefixed "+ ") instead of running them
  key=value    config overrides, passed to the trainer (e.g. algorithm.beta=2.0)

Ctrl-C while streaming stops only the streaming; training goes on. Watch it again with
launch/watch_tpu.sh --name NAME. Starting again stops the previous run on that VM first.
EOF
}

NAME="" CONFIG="" RUN_DIR="" SYNC=1 DETACH=0 STOP_GRACE=600
OVERRIDES=()
while (($#)); do
  case $1 in
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --run-dir) need_value "$@"; RUN_DIR=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE_FLAG=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT_FLAG=$2; shift 2 ;;
    --no-sync) SYNC=0; shift ;;
    --detach) DETACH=1; shift ;;
    --stop-grace) need_value "$@"; STOP_GRACE=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; OVERRIDES+=("$@"); break ;;
    --*) die "unknown argument '$1' (see --help)" ;;
    *) OVERRIDES+=("$1"); shift ;;
  esac
done

require_name "$NAME"
require_config "$CONFIG"
for override in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do
  [[ $override == *=* ]] || die "override '$override' must look like section.key=value"
done
[[ $STOP_GRACE =~ ^[0-9]+$ ]] || die "--stop-grace must be a number of seconds, got '$STOP_GRACE'"
[[ -z $RUN_DIR ]] || OVERRIDES+=("trainer.run_dir=$RUN_DIR")
require_cloud

# The sync stops the run going on there first (gracefully), as `start` does.
((SYNC)) && PACS_JAX_STOP_GRACE=$STOP_GRACE sync_code "$NAME"

# printf %q quotes each argument for the worker's bash, so values with spaces survive ssh.
train_args="$(printf ' %q' --config "$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"})"
note "Starting training on every worker of $NAME ..."
run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${GCLOUD_WHERE[@]}" \
  --command="PACS_JAX_STOP_GRACE=$STOP_GRACE $REMOTE_WORKER start $REMOTE_VENV/bin/python -m pacs_jax train$train_args"

if ((DETACH)); then
  note "Training runs in the background; watch it with launch/watch_tpu.sh --name $NAME"
  exit 0
fi
note "Streaming worker 0's log (Ctrl-C stops the streaming, not the training) ..."
run gcloud compute tpus tpu-vm ssh "$NAME" --worker=0 "${GCLOUD_WHERE[@]}" \
  --command="$REMOTE_WORKER follow"
