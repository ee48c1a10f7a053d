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
                           [--stop-grace SECONDS] [--env KEY=VALUE ...] [--env-file FILE]
                           [--dry-run] [--] [key=value ...]

  --config     training config, a path inside this repository (it is copied to the workers)
  --run-dir    sets trainer.run_dir; use gs://... so metrics and checkpoints outlive the VM
  --no-sync    do not copy the working tree to the workers first (setup_tpu.sh did)
  --detach     return once training has started instead of streaming worker 0's log
  --stop-grace a run already going on the VM is stopped first: SIGTERM, then this many seconds
               to finish its step and save before SIGKILL (default 600)
  --env        an environment variable for the trainer on every worker (repeatable), e.g.
               --env LIBTPU_INIT_ARGS=--xla_tpu_enable_latency_hiding_scheduler=true. It shows in
               the ssh command line: put secrets in --env-file
  --env-file   a file of KEY=VALUE lines (WANDB_API_KEY=..., HF_TOKEN=...) copied to every worker
               (~/.pacs_jax_env, readable by its owner only) and exported to the trainer
  --dry-run    print the gcloud commands (one per line, prefixed "+ ") instead of running them
  key=value    config overrides, passed to the trainer (e.g. algorithm.beta=2.0)

Ctrl-C while streaming stops only the streaming; training goes on. Watch it again with
launch/watch_tpu.sh --name NAME. Starting again stops the previous run on that VM first.
EOF
}

NAME="" CONFIG="" RUN_DIR="" SYNC=1 DETACH=0 STOP_GRACE=${PACS_JAX_STOP_GRACE:-600} ENV_FILE=""
OVERRIDES=()
ENVS=()
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
    --env) need_value "$@"; ENVS+=("$2"); shift 2 ;;
    --env-file) need_value "$@"; ENV_FILE=$2; shift 2 ;;
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
for env in ${ENVS[@]+"${ENVS[@]}"}; do
  [[ $env =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env '$env' must look like KEY=VALUE (e.g. --env HF_TOKEN=hf_...)"
done
if [[ -n $ENV_FILE ]]; then
  [[ -f $ENV_FILE ]] || ((DRY_RUN)) || die "--env-file $ENV_FILE: no such file"
  [[ ! -f $ENV_FILE ]] || ! grep -vE '^[[:space:]]*(#|$)|^(export[[:space:]]+)?[A-Za-z_][A-Za-z0-9_]*=' "$ENV_FILE" >/dev/null ||
    die "--env-file $ENV_FILE: every line must be KEY=VALUE (or a # comment); this one is not: \
$(grep -vE '^[[:space:]]*(#|$)|^(export[[:space:]]+)?[A-Za-z_][A-Za-z0-9_]*=' "$ENV_FILE" | head -n 1 | cut -c1-40)"
fi
# The run's directory (the last trainer.run_dir given): the workers copy their logs there.
TRAIN_RUN_DIR=""
for override in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do
  [[ $override == trainer.run_dir=* ]] && TRAIN_RUN_DIR=${override#trainer.run_dir=}
done
require_cloud

# The sync stops the run going on there first (gracefully), as `start` does.
((SYNC)) && PACS_JAX_STOP_GRACE=$STOP_GRACE sync_code "$NAME"

# printf %q quotes each argument for the worker's bash, so values with spaces survive ssh.
train_args="$(printf ' %q' --config "$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"})"
worker_env="PACS_JAX_STOP_GRACE=$STOP_GRACE"
[[ -z $TRAIN_RUN_DIR ]] || worker_env+="$(printf ' %q' "PACS_JAX_RUN_DIR=$TRAIN_RUN_DIR")"
if [[ -n $ENV_FILE ]]; then
  # Copied, not put on the command line: the values (tokens) stay out of ssh and ps.
  run gcloud compute tpus tpu-vm scp "$ENV_FILE" "$NAME:.pacs_jax_env" --worker=all "${GCLOUD_WHERE[@]}"
  run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${GCLOUD_WHERE[@]}" --command="chmod 600 \$HOME/.pacs_jax_env"
  # shellcheck disable=SC2016
  worker_env+=' PACS_JAX_ENV_FILE=$HOME/.pacs_jax_env'
fi
[[ ${#ENVS[@]} -eq 0 ]] || worker_env+="$(printf ' %q' "${ENVS[@]}")"
note "Starting training on every worker of $NAME ..."
run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${GCLOUD_WHERE[@]}" \
  --command="$worker_env $REMOTE_WORKER start $REMOTE_VENV/bin/python -m pacs_jax train$train_args"

if ((DETACH)); then
  note "Training runs in the background; watch it with launch/watch_tpu.sh --name $NAME"
  exit 0
fi
note "Streaming worker 0's log (Ctrl-C stops the streaming, not the training) ..."
run gcloud compute tpus tpu-vm ssh "$NAME" --worker=0 "${GCLOUD_WHERE[@]}" \
  --command="$REMOTE_WORKER follow"
