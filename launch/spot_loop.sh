#!/usr/bin/env bash
# Train on spot TPU VMs until the run is finished: create a spot VM (optionally queued), set it up,
# start training with trainer.resume=auto and the run directory on gs://, and watch. When the VM
# is preempted (or the training process dies) delete it, recreate it, and resume from the latest
# checkpoint in the bucket. Stops when the trainer has written RUN_DIR/DONE, or after
# --max-restarts restarts.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/spot_loop.sh --name NAME --type TYPE --config CFG --run-dir gs://BUCKET/runs/RUN
                           [--zone ZONE] [--project PROJECT] [--queued] [--runtime-version V]
                           [--max-restarts N] [--poll-seconds S] [--keep] [--dry-run]
                           [--] [key=value ...]

  --run-dir        gs:// folder for metrics and checkpoints (a spot VM's disk dies with it)
  --queued         ask for the spot VM through a queued resource (waits for capacity)
  --max-restarts   give up after this many preemptions / crashes / failed creations (default 20)
  --poll-seconds   how often to check the run and the VM (default 120)
  --keep           keep the VM when the run is finished (default: delete it)
  --dry-run        print the gcloud commands of one pass (prefixed "+ ") instead of running them
  key=value        config overrides for the trainer

The trainer must write RUN_DIR/DONE once it reaches trainer.total_steps; that ends the loop.
Ctrl-C stops the loop; the VM and the training on it go on (delete with launch/delete_tpu.sh).
EOF
}

NAME="" TYPE="" CONFIG="" RUN_DIR="" RUNTIME="" QUEUED=0 KEEP=0 MAX_RESTARTS=20 POLL=120
OVERRIDES=()
while (($#)); do
  case $1 in
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --type) need_value "$@"; TYPE=$2; shift 2 ;;
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --run-dir) need_value "$@"; RUN_DIR=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE_FLAG=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT_FLAG=$2; shift 2 ;;
    --runtime-version) need_value "$@"; RUNTIME=$2; shift 2 ;;
    --max-restarts) need_value "$@"; MAX_RESTARTS=$2; shift 2 ;;
    --poll-seconds) need_value "$@"; POLL=$2; shift 2 ;;
    --queued) QUEUED=1; shift ;;
    --keep) KEEP=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; OVERRIDES+=("$@"); break ;;
    --*) die "unknown argument '$1' (see --help)" ;;
    *) OVERRIDES+=("$1"); shift ;;
  esac
done

require_name "$NAME"
require_type "$TYPE"
require_config "$CONFIG"
[[ $RUN_DIR == gs://* ]] || die "--run-dir must be a gs:// path (e.g. --run-dir gs://BUCKET/runs/$NAME): \
a spot VM loses its disk when preempted, and the run resumes from the checkpoints kept there"
RUN_DIR=${RUN_DIR%/}
for override in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do
  case $override in
    trainer.run_dir=* | trainer.resume=*)
      die "override '$override': spot_loop.sh sets trainer.run_dir (from --run-dir) and trainer.resume=auto" ;;
    *=*) ;;
    *) die "override '$override' must look like section.key=value" ;;
  esac
done
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || die "--max-restarts must be a number, got '$MAX_RESTARTS'"
[[ $POLL =~ ^[0-9]+$ ]] || die "--poll-seconds must be a number, got '$POLL'"
require_cloud

WHERE_ARGS=(--name "$NAME" --zone "$ZONE_ID" --project "$PROJECT_ID")
((DRY_RUN)) && WHERE_ARGS+=(--dry-run)
QUEUED_ARG=()
((QUEUED)) && QUEUED_ARG=(--queued)
CREATE_ARGS=(--type "$TYPE" --spot ${QUEUED_ARG[@]+"${QUEUED_ARG[@]}"})
[[ -z $RUNTIME ]] || CREATE_ARGS+=(--runtime-version "$RUNTIME")

run_finished() {
  if ((DRY_RUN)); then
    run gcloud storage ls "$RUN_DIR/DONE"
    return 1
  fi
  gcloud storage ls "$RUN_DIR/DONE" >/dev/null 2>&1
}

# Worker 0's training run: "running PID", "exited RC", "killed", "none", or "unreachable".
worker_status() {
  gcloud compute tpus tpu-vm ssh "$NAME" --worker=0 "${GCLOUD_WHERE[@]}" \
    --command="$REMOTE_WORKER status" 2>/dev/null || echo unreachable
}

# Whatever is left of the VM (preempted, suspended, failed) goes, then a new spot VM is made.
recreate_tpu() {
  local left
  if ((QUEUED)); then left="$(queued_state "$NAME")"; else left="$(tpu_state "$NAME")"; fi
  if [[ $left != NOT_FOUND && $left != "(dry run)" ]]; then
    bash "$LAUNCH_DIR/delete_tpu.sh" "${WHERE_ARGS[@]}" ${QUEUED_ARG[@]+"${QUEUED_ARG[@]}"} || return 1
  fi
  bash "$LAUNCH_DIR/create_tpu.sh" "${WHERE_ARGS[@]}" "${CREATE_ARGS[@]}"
}

# One launch: a READY VM (recreated unless it is), the code installed, training started.
launch() {
  [[ "$(tpu_state "$NAME")" == READY ]] || recreate_tpu || return 1
  bash "$LAUNCH_DIR/setup_tpu.sh" "${WHERE_ARGS[@]}" || return 1
  bash "$LAUNCH_DIR/train_tpu.sh" "${WHERE_ARGS[@]}" --config "$CONFIG" --no-sync --detach \
    -- ${OVERRIDES[@]+"${OVERRIDES[@]}"} trainer.resume=auto "trainer.run_dir=$RUN_DIR"
}

# Sleep until something changes; print what: "done", "vm STATE" or worker 0's status.
wait_for_change() {
  local state status unreachable=0
  while :; do
    sleep "$POLL"
    if run_finished; then echo "done"; return; fi
    state="$(tpu_state "$NAME")"
    [[ $state == READY ]] || { echo "vm $state"; return; }
    status="$(worker_status)"
    case $status in
      running*) unreachable=0 ;;
      # A READY VM that ssh cannot reach once is usually a passing hiccup: restarting would
      # throw away the steps since the last checkpoint, so wait for three misses in a row.
      unreachable) ((++unreachable < 3)) || { echo "$status"; return; } ;;
      *) echo "$status"; return ;;
    esac
  done
}

restarts=0
while ! run_finished; do
  if launch; then
    if ((DRY_RUN)); then
      note "(dry run: one pass shown; a real run now checks every $POLL s for $RUN_DIR/DONE,"
      note " the VM's state (tpu-vm describe) and worker 0's training status (ssh), and relaunches)"
      break
    fi
    note "Training on $NAME; checking every $POLL s (restarts so far: $restarts/$MAX_RESTARTS)"
    why="$(wait_for_change)"
    [[ $why == "done" ]] && break
    if [[ $why == "exited 0" ]]; then
      run_finished && break
      die "training exited with status 0 but $RUN_DIR/DONE does not exist: the trainer must \
write DONE when it reaches trainer.total_steps"
    fi
  else
    why="launch failed"
    sleep "$POLL"
  fi
  restarts=$((restarts + 1))
  ((restarts <= MAX_RESTARTS)) ||
    die "giving up after $MAX_RESTARTS restarts (last: $why); $NAME is left as it is for inspection"
  note "Restart $restarts/$MAX_RESTARTS ($why): resuming from the latest checkpoint in $RUN_DIR/checkpoints"
done

((DRY_RUN)) || note "Run finished: $RUN_DIR/DONE exists"
if ((QUEUED)); then left="$(queued_state "$NAME")"; else left="$(tpu_state "$NAME")"; fi
if ((!KEEP)) && [[ $left != NOT_FOUND ]]; then
  bash "$LAUNCH_DIR/delete_tpu.sh" "${WHERE_ARGS[@]}" ${QUEUED_ARG[@]+"${QUEUED_ARG[@]}"}
fi
