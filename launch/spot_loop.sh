#!/usr/bin/env bash
# Train on spot TPU VMs until the run is finished. Run it on an always-on machine (a laptop that
# sleeps stops it; a small e2 VM or Cloud Shell session that stays up does not): it creates the
# spot VM (optionally queued), sets it up, starts training with trainer.resume=auto and the run
# directory on gs://, and watches.
#   - A VM that is preempted, terminated or suspended is deleted and recreated, and the run resumes
#     from its latest checkpoint in the bucket.
#   - A VM on its way somewhere (creating, restarting, repairing, queued for capacity), and a
#     `gcloud describe` that fails (a network blip: retried with backoff), is waited out.
#   - A trainer that stopped without DONE after saving (exit 0: a graceful stop) is started again.
#     One that crashed is started again on the same VM (no new setup) until it has failed
#     --max-crashes times in a row in the same way; then the loop stops and prints the log's end.
#     A bad config or input (exit status 2) stops the loop at once.
#   - Only a VM this loop created (or was told to --adopt) is ever deleted.
# Stops when the trainer has written RUN_DIR/DONE.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/spot_loop.sh --name NAME --type TYPE --config CFG --run-dir gs://BUCKET/runs/RUN
                           [--zone ZONE] [--project PROJECT] [--queued] [--runtime-version V]
                           [--adopt] [--max-restarts N] [--max-crashes N] [--poll-seconds S]
                           [--stop-grace S] [--setup-command CMD] [--keep] [--dry-run]
                           [create_tpu.sh options: --reserved --network NET --subnetwork SUBNET
                            --internal-ips --service-account EMAIL --scopes S --labels K=V,...
                            --metadata K=V,... --tags T,... --gcloud-flag FLAG]
                           [--] [key=value ...]

  --run-dir        gs:// folder for metrics and checkpoints (a spot VM's disk dies with it)
  --queued         ask for the spot VM through a queued resource (waits for capacity)
  --adopt          NAME exists already (e.g. this loop was restarted): train on it, and delete it
                   when it is preempted or the run is done. Without --adopt an existing NAME is
                   never touched: the loop stops and says so
  --max-restarts   give up after this many preemptions / relaunches (default 20)
  --max-crashes    give up after the trainer failed this many times in a row with the same exit
                   status and last log line (default 3)
  --poll-seconds   how often to check the run and the VM (default 120)
  --stop-grace     seconds a stopped trainer gets to finish its step and save before SIGKILL
                   (default 600; used when a run is restarted on the VM)
  --setup-command  passed to setup_tpu.sh (runs on every worker of every new VM)
  --keep           keep the VM when the run is finished (default: delete it)
  --dry-run        print the gcloud commands of one pass (prefixed "+ ") instead of running them
  key=value        config overrides for the trainer

The trainer writes RUN_DIR/DONE once it reaches trainer.total_steps; that ends the loop.
Ctrl-C stops the loop; the VM and the training on it go on (start the loop again with --adopt,
or delete the VM with launch/delete_tpu.sh).
EOF
}

NAME="" TYPE="" CONFIG="" RUN_DIR="" RUNTIME="" QUEUED=0 KEEP=0 ADOPT=0 MAX_RESTARTS=20 MAX_CRASHES=3
POLL=120 STOP_GRACE=600 SETUP_COMMAND=""
OVERRIDES=()
CREATE_EXTRA=()
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
    --max-crashes) need_value "$@"; MAX_CRASHES=$2; shift 2 ;;
    --poll-seconds) need_value "$@"; POLL=$2; shift 2 ;;
    --stop-grace) need_value "$@"; STOP_GRACE=$2; shift 2 ;;
    --setup-command) need_value "$@"; SETUP_COMMAND=$2; shift 2 ;;
    --network | --subnetwork | --service-account | --scopes | --labels | --metadata | --tags)
      need_value "$@"; CREATE_EXTRA+=("$1" "$2"); shift 2 ;;
    --gcloud-flag) [[ $# -ge 2 ]] || die "--gcloud-flag needs a gcloud flag (see --help)"
      CREATE_EXTRA+=("--gcloud-flag=$2"); shift 2 ;;
    --gcloud-flag=*) CREATE_EXTRA+=("$1"); shift ;;
    --reserved | --internal-ips) CREATE_EXTRA+=("$1"); shift ;;
    --queued) QUEUED=1; shift ;;
    --keep) KEEP=1; shift ;;
    --adopt) ADOPT=1; shift ;;
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
    trainer.checkpoint_dir=gs://*) ;;
    trainer.checkpoint_dir=?*)
      die "override '$override': trainer.checkpoint_dir must be on gs:// too (or left out: RUN_DIR/checkpoints)" ;;
    *=*) ;;
    *) die "override '$override' must look like section.key=value" ;;
  esac
done
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || die "--max-restarts must be a number, got '$MAX_RESTARTS'"
[[ $MAX_CRASHES =~ ^[1-9][0-9]*$ ]] || die "--max-crashes must be a number >= 1, got '$MAX_CRASHES'"
[[ $POLL =~ ^[0-9]+$ ]] || die "--poll-seconds must be a number, got '$POLL'"
[[ $STOP_GRACE =~ ^[0-9]+$ ]] || die "--stop-grace must be a number of seconds, got '$STOP_GRACE'"
require_cloud

WHERE_ARGS=(--name "$NAME" --zone "$ZONE_ID" --project "$PROJECT_ID")
((DRY_RUN)) && WHERE_ARGS+=(--dry-run)
QUEUED_ARG=()
((QUEUED)) && QUEUED_ARG=(--queued)
CREATE_ARGS=(--type "$TYPE" --spot ${QUEUED_ARG[@]+"${QUEUED_ARG[@]}"} ${CREATE_EXTRA[@]+"${CREATE_EXTRA[@]}"})
[[ -z $RUNTIME ]] || CREATE_ARGS+=(--runtime-version "$RUNTIME")
SETUP_ARGS=()
[[ -z $SETUP_COMMAND ]] || SETUP_ARGS=(--setup-command "$SETUP_COMMAND")

run_finished() {
  if ((DRY_RUN)); then
    run gcloud storage ls "$RUN_DIR/DONE"
    return 1
  fi
  gcloud storage ls "$RUN_DIR/DONE" >/dev/null 2>&1
}

# The VM's state; for a queued resource its own state until it is ACTIVE, then the VM's.
vm_state() {
  local state
  if ((QUEUED)); then
    state="$(queued_state "$NAME")"
    [[ $state != ACTIVE ]] && { echo "$state"; return; }
  fi
  tpu_state "$NAME"
}

# Worker 0's training run: "running PID", "exited RC", "killed", "none", or "unreachable".
worker_status() {
  local out
  out="$(gcloud compute tpus tpu-vm ssh "$NAME" --worker=0 "${GCLOUD_WHERE[@]}" \
    --command="$REMOTE_WORKER status" 2>/dev/null)" || out=""
  out="$(tail -n 1 <<<"$out")"
  [[ $out =~ ^(running|exited|killed|none) ]] && echo "$out" || echo unreachable
}

worker_log_tail() {
  gcloud compute tpus tpu-vm ssh "$NAME" --worker=0 "${GCLOUD_WHERE[@]}" \
    --command="$REMOTE_WORKER tail 30" 2>/dev/null || echo "(worker 0's log could not be read)"
}

delete_vm() {
  bash "$LAUNCH_DIR/delete_tpu.sh" "${WHERE_ARGS[@]}" ${QUEUED_ARG[@]+"${QUEUED_ARG[@]}"} --yes
}

# Whatever is left of the VM goes (only ours: checked by the caller), then a new spot VM is made.
recreate_vm() {
  local left=$1
  if [[ $left != NOT_FOUND && $left != "(dry run)" ]]; then
    delete_vm || return 1
  fi
  bash "$LAUNCH_DIR/create_tpu.sh" "${WHERE_ARGS[@]}" "${CREATE_ARGS[@]}"
}

start_training() {
  bash "$LAUNCH_DIR/train_tpu.sh" "${WHERE_ARGS[@]}" --config "$CONFIG" --no-sync --detach \
    --stop-grace "$STOP_GRACE" -- ${OVERRIDES[@]+"${OVERRIDES[@]}"} trainer.resume=auto "trainer.run_dir=$RUN_DIR"
}

count_restart() {
  restarts=$((restarts + 1))
  ((restarts <= MAX_RESTARTS)) ||
    die "giving up after $MAX_RESTARTS restarts (last: $1); $NAME is left as it is for inspection"
  note "Restart $restarts/$MAX_RESTARTS ($1): resuming from the latest checkpoint in $RUN_DIR"
}

if run_finished; then
  note "Run finished already: $RUN_DIR/DONE exists; nothing to do"
  exit 0
fi

state="$(vm_state)"
OWNED=$ADOPT
if [[ $state != NOT_FOUND && $state != "(dry run)" ]] && ((!ADOPT)); then
  die "$NAME exists already ($state) and this loop did not create it: pass --adopt to train on it \
(the loop then deletes and recreates it when it is preempted, and deletes it when the run is done \
unless --keep), or choose another --name"
fi

if ((DRY_RUN)); then
  ((ADOPT)) || recreate_vm "$state" # --adopt: the VM is there (a real run creates it only when it is gone)
  bash "$LAUNCH_DIR/setup_tpu.sh" "${WHERE_ARGS[@]}" ${SETUP_ARGS[@]+"${SETUP_ARGS[@]}"}
  start_training
  note "(dry run: one pass shown; a real run now checks every $POLL s for $RUN_DIR/DONE,"
  note " the VM's state (tpu-vm describe, retried on errors) and worker 0's training status (ssh),"
  note " and relaunches; when DONE exists it deletes the VM it created unless --keep)"
  ((KEEP)) || delete_vm
  exit 0
fi

restarts=0 crashes=0 last_failure="" set_up=0 launched=0 unreachable=0 interrupted=0
if [[ $state == NOT_FOUND ]]; then
  if recreate_vm NOT_FOUND; then OWNED=1; else count_restart "VM creation failed"; sleep "$POLL"; fi
fi
while :; do
  run_finished && break
  state="$(vm_state)"
  case "$(state_kind "$state")" in
    wait)
      note "$(date -u +%TZ) $NAME is $state: waiting"
      ((launched)) && [[ $state != UNKNOWN ]] && interrupted=1
      ;;
    gone)
      ((OWNED)) || [[ $state == NOT_FOUND ]] ||
        die "$NAME is $state and this loop did not create it; pass --adopt to let the loop replace it"
      ((launched || set_up)) && count_restart "VM $state"
      set_up=0 launched=0 interrupted=0
      if recreate_vm "$state"; then
        OWNED=1
        continue
      fi
      note "creating $NAME failed; trying again in $POLL s"
      count_restart "VM creation failed"
      ;;
    ok)
      if ((!set_up)); then
        if bash "$LAUNCH_DIR/setup_tpu.sh" "${WHERE_ARGS[@]}" ${SETUP_ARGS[@]+"${SETUP_ARGS[@]}"}; then
          set_up=1
        else
          count_restart "setup failed"
          sleep "$POLL"
          continue
        fi
      fi
      if ((!launched)); then
        if start_training; then
          launched=1 unreachable=0 interrupted=0
          note "Training on $NAME; checking every $POLL s (restarts so far: $restarts/$MAX_RESTARTS)"
        else
          count_restart "starting the trainer failed"
        fi
        sleep "$POLL"
        continue
      fi
      status="$(worker_status)"
      case $status in
        running*) unreachable=0 ;;
        unreachable)
          # A READY VM that ssh cannot reach is usually a passing hiccup; the run goes on there.
          unreachable=$((unreachable + 1))
          note "$(date -u +%TZ) worker 0 of $NAME did not answer over ssh ($unreachable in a row); waiting"
          ;;
        "exited 0")
          run_finished && break
          # The trainer saves and exits 0 when it is sent SIGTERM (maintenance, a stop): resume.
          launched=0
          count_restart "the trainer stopped after saving, without DONE"
          ;;
        *)
          launched=0
          if ((interrupted)); then
            # The VM restarted or was repaired under the run: not the trainer's fault.
            count_restart "the VM restarted under the trainer ($status)"
            continue
          fi
          tail_lines="$(worker_log_tail)"
          last_line="$(grep -v '^===' <<<"$tail_lines" | grep -v '^[[:space:]]*$' | tail -n 1 || true)"
          failure="$status: $last_line"
          if [[ $failure == "$last_failure" ]]; then crashes=$((crashes + 1)); else crashes=1; fi
          last_failure=$failure
          if [[ $status == "exited 2" ]] || ((crashes >= MAX_CRASHES)); then
            printf '%s\n' "--- the end of worker 0's log (~/pacs_jax_run/train.log on $NAME):" "$tail_lines" >&2
            if [[ $status == "exited 2" ]]; then
              die "the trainer rejected its config or input (exit status 2; see above); fix it and start \
the loop again with --adopt. $NAME is left as it is"
            fi
            die "the trainer failed $crashes times in a row the same way ($failure); see the log above. \
$NAME is left as it is: fix the cause and start the loop again with --adopt"
          fi
          count_restart "the trainer failed ($failure), $crashes/$MAX_CRASHES in a row"
          continue
          ;;
      esac
      ;;
  esac
  sleep "$POLL"
done

note "Run finished: $RUN_DIR/DONE exists"
if ((KEEP)); then
  note "$NAME is kept (--keep); delete it with launch/delete_tpu.sh --name $NAME"
elif ((OWNED)); then
  [[ "$(vm_state)" == NOT_FOUND ]] || delete_vm
else
  note "$NAME was not created by this loop: left as it is"
fi
