#!/usr/bin/env bash
# Train on spot TPU VMs until the run is finished. Run it on an always-on machine (a laptop that
# sleeps stops it; a small e2 VM or Cloud Shell session that stays up does not): it creates the
# spot VM (optionally queued), sets it up, starts training with trainer.resume=auto and the run
# directory on gs://, and watches every worker. launch/README.md tells what happens when.
#   - No capacity (a stockout): a failed create is tried again with backoff for as long as
#     --max-wait allows (default: for ever). It is not a restart.
#   - A VM that is preempted, terminated or suspended (a queued resource that FAILED or was
#     SUSPENDED too) is deleted and recreated, and the run resumes from its latest checkpoint.
#   - A VM on its way somewhere (creating, restarting, repairing, queued for capacity), and a
#     `gcloud describe` that fails (a network blip: retried with backoff), is waited out.
#   - Every worker is asked how its trainer is (one ssh to all workers). When one has failed,
#     every worker's log goes to RUN_DIR/logs/, the end of the log of the worker that failed
#     first is shown, and the run starts again on the same VM (no new setup) until it has failed
#     --max-crashes times in a row in the same way; then the loop stops. A bad config or input
#     (exit status 2) stops it at once; a passing I/O failure (exit status 75) never does.
#   - A run that logs no new step for --stall-minutes (a hung worker, a stuck collective) is
#     stopped, its logs collected, and started again.
#   - A trainer that stopped after saving (exit 0 on every worker: a graceful stop) is started again.
#   - Restarts are counted over --restart-window: more than --max-restarts in that time stops the loop.
#   - Only a VM this loop created (or was told to --adopt) is ever deleted.
# Stops when the trainer has written RUN_DIR/DONE. Every sleep and timeout can be shortened with
# environment variables (PACS_LAUNCH_*_SECONDS, listed in --help) so tests run fast.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/spot_loop.sh --name NAME --type TYPE --config CFG --run-dir gs://BUCKET/runs/RUN
                           [--zone ZONE] [--project PROJECT] [--queued] [--runtime-version V]
                           [--adopt] [--max-wait DURATION] [--max-restarts N]
                           [--restart-window DURATION] [--max-crashes N] [--stall-minutes M]
                           [--poll-seconds S] [--stop-grace S] [--setup-command CMD] [--with-wandb]
                           [--env KEY=VALUE ...] [--env-file FILE] [--keep] [--dry-run]
                           [create_tpu.sh options: --reserved --network NET --subnetwork SUBNET
                            --internal-ips --service-account EMAIL --scopes S --labels K=V,...
                            --metadata K=V,... --tags T,... --gcloud-flag FLAG]
                           [--] [key=value ...]

  --run-dir        gs:// folder for metrics and checkpoints (a spot VM's disk dies with it); the
                   workers' logs go to RUN_DIR/logs/worker-N/, the rollouts to RUN_DIR/rollouts/
  --queued         ask for the spot VM through a queued resource (waits for capacity)
  --adopt          NAME exists already (e.g. this loop was restarted): train on it (a trainer
                   running on every worker is left running and watched), and delete it when it
                   is preempted or the run is done. Without --adopt an existing NAME is never
                   touched: the loop stops and says so
  --max-wait       give up when no VM could be had for this long: failed creates (a stockout) and
                   a queued resource waiting for capacity (default 0: never give up). DURATION is
                   seconds, or a number with s, m, h or d (90m, 12h, 2d)
  --max-restarts   give up after more than this many restarts (preemptions, relaunches after a
                   crash or a hang) within --restart-window (default 20)
  --restart-window the window restarts are counted in (default 6h; 0: the whole run)
  --max-crashes    give up after the trainer failed this many times in a row with the same exit
                   status and last log line (default 3)
  --stall-minutes  restart the run when no new step was logged for this long (default 60; 0: off).
                   Counted from the start, so it must cover loading, compiling and an evaluation
  --poll-seconds   how often to check the run and the VM (default 120)
  --stop-grace     seconds a stopped trainer gets to finish its step and save before SIGKILL
                   (default 600; used when a run is restarted on the VM)
  --setup-command  passed to setup_tpu.sh (runs on every worker of every new VM)
  --with-wandb     install wandb on the workers (on by itself when the config or an override
                   sets trainer.wandb true)
  --env, --env-file  environment variables for the trainer (see train_tpu.sh --help): WANDB_API_KEY,
                   HF_TOKEN, LIBTPU_INIT_ARGS, ...
  --keep           keep the VM when the run is finished (default: delete it)
  --dry-run        print the gcloud commands of one pass (prefixed "+ ") instead of running them
  key=value        config overrides for the trainer

The trainer writes RUN_DIR/DONE once it reaches trainer.total_steps; that ends the loop.
Ctrl-C stops the loop; the VM and the training on it go on (start the loop again with --adopt,
or delete the VM with launch/delete_tpu.sh).

Environment (for tests and impatient people): PACS_LAUNCH_POLL_SECONDS (--poll-seconds' default),
PACS_LAUNCH_CREATE_RETRY_SECONDS (first pause after a failed create, default 60; doubles up to
PACS_LAUNCH_CREATE_RETRY_MAX_SECONDS, default 900), PACS_LAUNCH_STALL_SECONDS (overrides
--stall-minutes), PACS_LAUNCH_SSH_TIMEOUT_SECONDS (one ssh to the workers, default 300),
PACS_LAUNCH_KILL_GRACE_SECONDS (how long a failed or hung run gets to stop, default 60),
PACS_LAUNCH_RETRY_SECONDS / PACS_LAUNCH_DESCRIBE_TRIES (describe retries), PACS_JAX_STOP_GRACE.
EOF
}

# Seconds in a duration: 3600, 90m, 12h, 2d (0: none).
duration_seconds() {
  local value=$1 flag=$2
  [[ $value =~ ^([0-9]+)([smhd]?)$ ]] ||
    die "$flag must be a duration: seconds, or a number with s, m, h or d (e.g. 90m, 12h), got '$value'"
  case ${BASH_REMATCH[2]} in
    "" | s) echo "${BASH_REMATCH[1]}" ;;
    m) echo $((BASH_REMATCH[1] * 60)) ;;
    h) echo $((BASH_REMATCH[1] * 3600)) ;;
    d) echo $((BASH_REMATCH[1] * 86400)) ;;
  esac
}

human() {
  local s=$1
  if ((s % 86400 == 0 && s >= 86400)); then echo "$((s / 86400))d"
  elif ((s % 3600 == 0 && s >= 3600)); then echo "$((s / 3600))h"
  elif ((s % 60 == 0 && s >= 60)); then echo "$((s / 60))m"
  else echo "${s}s"; fi
}

NAME="" TYPE="" CONFIG="" RUN_DIR="" RUNTIME="" QUEUED=0 KEEP=0 ADOPT=0 MAX_RESTARTS=20 MAX_CRASHES=3
POLL=${PACS_LAUNCH_POLL_SECONDS:-120} STOP_GRACE=${PACS_JAX_STOP_GRACE:-600} SETUP_COMMAND="" WANDB=0
MAX_WAIT=0 RESTART_WINDOW=6h STALL_MINUTES=60
OVERRIDES=()
CREATE_EXTRA=()
TRAIN_EXTRA=()
while (($#)); do
  case $1 in
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --type) need_value "$@"; TYPE=$2; shift 2 ;;
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --run-dir) need_value "$@"; RUN_DIR=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE_FLAG=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT_FLAG=$2; shift 2 ;;
    --runtime-version) need_value "$@"; RUNTIME=$2; shift 2 ;;
    --max-wait) need_value "$@"; MAX_WAIT=$2; shift 2 ;;
    --max-restarts) need_value "$@"; MAX_RESTARTS=$2; shift 2 ;;
    --restart-window) need_value "$@"; RESTART_WINDOW=$2; shift 2 ;;
    --max-crashes) need_value "$@"; MAX_CRASHES=$2; shift 2 ;;
    --stall-minutes) need_value "$@"; STALL_MINUTES=$2; shift 2 ;;
    --poll-seconds) need_value "$@"; POLL=$2; shift 2 ;;
    --stop-grace) need_value "$@"; STOP_GRACE=$2; shift 2 ;;
    --setup-command) need_value "$@"; SETUP_COMMAND=$2; shift 2 ;;
    --env | --env-file) need_value "$@"; TRAIN_EXTRA+=("$1" "$2"); shift 2 ;;
    --network | --subnetwork | --service-account | --scopes | --labels | --metadata | --tags)
      need_value "$@"; CREATE_EXTRA+=("$1" "$2"); shift 2 ;;
    --gcloud-flag) [[ $# -ge 2 ]] || die "--gcloud-flag needs a gcloud flag (see --help)"
      CREATE_EXTRA+=("--gcloud-flag=$2"); shift 2 ;;
    --gcloud-flag=*) CREATE_EXTRA+=("$1"); shift ;;
    --reserved | --internal-ips) CREATE_EXTRA+=("$1"); shift ;;
    --queued) QUEUED=1; shift ;;
    --keep) KEEP=1; shift ;;
    --adopt) ADOPT=1; shift ;;
    --with-wandb) WANDB=1; shift ;;
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
[[ $STALL_MINUTES =~ ^[0-9]+$ ]] || die "--stall-minutes must be a number of minutes (0: off), got '$STALL_MINUTES'"
MAX_WAIT="$(duration_seconds "$MAX_WAIT" --max-wait)"
RESTART_WINDOW="$(duration_seconds "$RESTART_WINDOW" --restart-window)"
STALL=${PACS_LAUNCH_STALL_SECONDS:-$((STALL_MINUTES * 60))}
CREATE_RETRY=${PACS_LAUNCH_CREATE_RETRY_SECONDS:-60}
CREATE_RETRY_MAX=${PACS_LAUNCH_CREATE_RETRY_MAX_SECONDS:-900}
SSH_TIMEOUT=${PACS_LAUNCH_SSH_TIMEOUT_SECONDS:-300}
KILL_GRACE=${PACS_LAUNCH_KILL_GRACE_SECONDS:-60}
HOSTS="$(tpu_hosts "$TYPE")"
wants_wandb "$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"} && WANDB=1
require_cloud

WHERE_ARGS=(--name "$NAME" --zone "$ZONE_ID" --project "$PROJECT_ID")
((DRY_RUN)) && WHERE_ARGS+=(--dry-run)
QUEUED_ARG=()
((QUEUED)) && QUEUED_ARG=(--queued)
# Queued: the request returns at once, and this loop watches it wait for capacity.
CREATE_ARGS=(--type "$TYPE" --spot ${QUEUED_ARG[@]+"${QUEUED_ARG[@]}"} ${CREATE_EXTRA[@]+"${CREATE_EXTRA[@]}"})
((QUEUED)) && CREATE_ARGS+=(--no-wait)
[[ -z $RUNTIME ]] || CREATE_ARGS+=(--runtime-version "$RUNTIME")
SETUP_ARGS=()
[[ -z $SETUP_COMMAND ]] || SETUP_ARGS=(--setup-command "$SETUP_COMMAND")
((WANDB)) && SETUP_ARGS+=(--with-wandb)
# gcloud's create errors no retry fixes (a wrong flag, no permission, the API off); anything else
# (no capacity: "There is no more capacity in the zone", code 8 / RESOURCE_EXHAUSTED, a quota
# still held by the VM being deleted, an internal error) is tried again.
PERMANENT_CREATE_ERROR='INVALID_ARGUMENT|PERMISSION_DENIED|SERVICE_DISABLED|Invalid value|invalid choice|unrecognized arguments|does not have permission|has not been used in project'

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

on_workers() {
  local worker=$1
  shift
  timeout "$SSH_TIMEOUT" gcloud compute tpus tpu-vm ssh "$NAME" --worker="$worker" "${GCLOUD_WHERE[@]}" --command="$*"
}

# Every worker's report (tpu_worker.sh report, one ssh to all of them): W_ID, W_STATUS, W_ENDED,
# W_IDLE (one entry per worker that answered) and STEPS, the most steps any worker's metrics hold.
read_workers() {
  local out tag id status ended idle steps
  local -A seen=()
  out="$(on_workers all "$REMOTE_WORKER report" 2>/dev/null)" || true
  W_ID=() W_STATUS=() W_ENDED=() W_IDLE=() STEPS=-1
  while read -r tag id status ended idle steps; do
    [[ $tag == pacs_worker && -n ${steps:-} && -z ${seen[$id]:-} ]] || continue
    seen[$id]=1
    W_ID+=("$id") W_STATUS+=("$status") W_ENDED+=("$ended") W_IDLE+=("$idle")
    [[ $steps =~ ^[0-9]+$ ]] && ((steps > STEPS)) && STEPS=$steps
  done <<<"$out"
  return 0
}

worker_log_tail() {
  local worker=$1
  [[ $worker =~ ^[0-9]+$ ]] || worker=0
  on_workers "$worker" "$REMOTE_WORKER tail 30" 2>/dev/null || echo "(worker $worker's log could not be read)"
}

# Every worker copies its logs to RUN_DIR/logs/worker-N/ (and the rollouts to RUN_DIR/rollouts/).
collect_logs() {
  on_workers all "$REMOTE_WORKER upload $RUN_DIR" >/dev/null 2>&1 ||
    note "warning: not every worker could copy its log to $RUN_DIR/logs/"
  note "every worker's log: $RUN_DIR/logs/worker-N/train.log"
}

# A failed or hung run: what is left of it on every worker is stopped (it cannot save without
# the others), before it starts again.
stop_workers() {
  on_workers all "$REMOTE_WORKER stop $KILL_GRACE" >/dev/null 2>&1 || true
}

delete_vm() {
  bash "$LAUNCH_DIR/delete_tpu.sh" "${WHERE_ARGS[@]}" ${QUEUED_ARG[@]+"${QUEUED_ARG[@]}"} --yes
}

# Whatever is left of the VM goes (only ours: checked by the caller), then a new spot VM is asked
# for. A create that fails for a reason no retry fixes stops the loop; one that fails otherwise (no
# capacity) returns 1, and the caller tries again later.
recreate_vm() {
  local left=$1 err rc=0
  if [[ $left != NOT_FOUND && $left != "(dry run)" ]]; then
    delete_vm || return 1
  fi
  OWNED=1 # the name is free now: whatever appears under it is this loop's, a failed create's leftovers included
  err="$(mktemp)"
  bash "$LAUNCH_DIR/create_tpu.sh" "${WHERE_ARGS[@]}" "${CREATE_ARGS[@]}" 2>"$err" || rc=$?
  cat "$err" >&2
  if ((rc != 0)) && grep -qE "$PERMANENT_CREATE_ERROR" "$err"; then
    rm -f "$err"
    die "creating $NAME failed in a way no retry fixes (see gcloud's message above); fix it and start the loop again"
  fi
  CREATE_ERROR="$(grep -v '^[[:space:]]*$' "$err" | tail -n 1 | cut -c1-300)"
  rm -f "$err"
  return "$rc"
}

start_training() {
  bash "$LAUNCH_DIR/train_tpu.sh" "${WHERE_ARGS[@]}" --config "$CONFIG" --no-sync --detach \
    --stop-grace "$STOP_GRACE" ${TRAIN_EXTRA[@]+"${TRAIN_EXTRA[@]}"} -- ${OVERRIDES[@]+"${OVERRIDES[@]}"} \
    trainer.resume=auto "trainer.run_dir=$RUN_DIR"
}

RESTART_TIMES=()
count_restart() {
  local now kept=() t
  now=$(date +%s)
  for t in ${RESTART_TIMES[@]+"${RESTART_TIMES[@]}"}; do
    ((RESTART_WINDOW == 0 || t > now - RESTART_WINDOW)) && kept+=("$t")
  done
  kept+=("$now")
  RESTART_TIMES=("${kept[@]}")
  local within="in this run"
  ((RESTART_WINDOW == 0)) || within="within $(human "$RESTART_WINDOW")"
  ((${#RESTART_TIMES[@]} <= MAX_RESTARTS)) ||
    die "giving up: ${#RESTART_TIMES[@]} restarts $within, more than --max-restarts $MAX_RESTARTS (last: $1); \
$NAME is left as it is for inspection"
  note "Restart ${#RESTART_TIMES[@]}/$MAX_RESTARTS $within ($1): resuming from the latest checkpoint in $RUN_DIR"
}

# Called while there is no usable VM: stops the loop once that has lasted --max-wait.
NO_VM_SINCE=""
no_vm_yet() {
  local now
  now=$(date +%s)
  [[ -n $NO_VM_SINCE ]] || NO_VM_SINCE=$now
  if ((MAX_WAIT > 0 && now - NO_VM_SINCE >= MAX_WAIT)); then
    die "no usable $TYPE VM for $(human $((now - NO_VM_SINCE))) (--max-wait $(human "$MAX_WAIT")): giving up. \
The run's checkpoints are in $RUN_DIR; start the loop again (--adopt if $NAME exists) to go on"
  fi
}

# The worker that failed first: the earliest recorded end; one with none (killed, nothing started)
# counts as first. Prints its index in W_ID.
first_failed() {
  local i best="" best_time=""
  for i in "${!W_ID[@]}"; do
    case ${W_STATUS[i]} in running | exited:0) continue ;; esac
    local t=${W_ENDED[i]}
    [[ $t =~ ^[0-9]+$ ]] || t=0
    if [[ -z $best ]] || ((t < best_time)); then best=$i best_time=$t; fi
  done
  echo "$best"
}

# The worker whose log has been quiet the longest (where a hang most likely began).
quietest() {
  local i best=0 most=-1
  for i in "${!W_ID[@]}"; do
    [[ ${W_IDLE[i]} =~ ^[0-9]+$ ]] && ((W_IDLE[i] > most)) && best=$i most=${W_IDLE[i]}
  done
  echo "$best"
}

show_log() {
  local worker=$1 lines=$2
  printf '%s\n' "--- the end of worker $worker's log (~/pacs_jax_run/train.log on worker $worker of $NAME; \
every worker's log is in $RUN_DIR/logs/):" "$lines" >&2
}

# Every worker's trainer running already (an adopted VM): leave it and watch it.
all_running() {
  local status
  ((${#W_ID[@]} >= HOSTS)) || return 1
  for status in "${W_STATUS[@]}"; do [[ $status == running ]] || return 1; done
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
  note " the VM's state (tpu-vm describe, retried on errors) and every worker's trainer (one ssh),"
  note " and relaunches; when DONE exists it deletes the VM it created unless --keep)"
  ((KEEP)) || delete_vm
  exit 0
fi

crashes=0 last_failure="" set_up=0 launched=0 unreachable=0 interrupted=0 check_adopted=$ADOPT
create_pause=$CREATE_RETRY last_steps="" last_progress=0 CREATE_ERROR=""
if [[ $state == NOT_FOUND ]]; then
  no_vm_yet
  if ! recreate_vm NOT_FOUND; then
    note "$(date -u +%TZ) creating $NAME failed (${CREATE_ERROR:-see above}); trying again in $create_pause s"
    sleep "$create_pause"
    create_pause=$((create_pause * 2 > CREATE_RETRY_MAX ? CREATE_RETRY_MAX : create_pause * 2))
  fi
fi
while :; do
  run_finished && break
  state="$(vm_state)"
  case "$(state_kind "$state")" in
    wait)
      note "$(date -u +%TZ) $NAME is $state: waiting"
      ((launched)) && [[ $state != UNKNOWN ]] && interrupted=1
      [[ $state == UNKNOWN ]] || no_vm_yet
      ;;
    gone)
      ((OWNED)) || [[ $state == NOT_FOUND ]] ||
        die "$NAME is $state and this loop did not create it; pass --adopt to let the loop replace it"
      ((launched || set_up)) && count_restart "VM $state"
      set_up=0 launched=0 interrupted=0 check_adopted=0
      no_vm_yet
      if recreate_vm "$state"; then
        create_pause=$CREATE_RETRY
        continue
      fi
      # A stockout is not a restart: asking again costs nothing, and capacity comes back.
      note "$(date -u +%TZ) creating $NAME failed (${CREATE_ERROR:-see above}); no VM for \
$(human $(($(date +%s) - NO_VM_SINCE))) so far; trying again in $create_pause s"
      sleep "$create_pause"
      create_pause=$((create_pause * 2 > CREATE_RETRY_MAX ? CREATE_RETRY_MAX : create_pause * 2))
      continue
      ;;
    ok)
      NO_VM_SINCE=""
      if ((check_adopted)); then
        check_adopted=0
        read_workers
        if all_running; then
          note "the trainer runs on every worker of $NAME: left running (--adopt), watching it"
          set_up=1 launched=1 last_progress=$(date +%s) last_steps=$STEPS
          sleep "$POLL"
          continue
        fi
      fi
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
          launched=1 unreachable=0 interrupted=0 last_progress=$(date +%s) last_steps=""
          note "Training on $NAME ($HOSTS worker(s)); checking every $POLL s (restarts so far: ${#RESTART_TIMES[@]})"
        else
          count_restart "starting the trainer failed"
        fi
        sleep "$POLL"
        continue
      fi
      read_workers
      if [[ $STEPS != "$last_steps" && $STEPS != -1 ]]; then
        last_steps=$STEPS last_progress=$(date +%s)
      fi
      failed="$(first_failed)"
      stopped=0
      for status in ${W_STATUS[@]+"${W_STATUS[@]}"}; do [[ $status == exited:0 ]] && stopped=$((stopped + 1)); done
      if [[ -n $failed ]]; then
        launched=0
        worker=${W_ID[failed]} status=${W_STATUS[failed]}
        collect_logs
        stop_workers
        if ((interrupted)); then
          # The VM restarted or was repaired under the run: not the trainer's fault.
          count_restart "the VM restarted under the trainer (worker $worker: $status)"
          continue
        fi
        tail_lines="$(worker_log_tail "$worker")"
        # The trainer's last words: what its own child processes printed after it died does not count.
        last_line="$(sed '/^=== .* exited with status/q' <<<"$tail_lines" | grep -v '^===' | grep -v '^[[:space:]]*$' |
          tail -n 1 || true)"
        if [[ $status == exited:75 ]]; then
          show_log "$worker" "$tail_lines"
          count_restart "worker $worker: a passing I/O failure outlasted the trainer's retries (exit status 75)"
          continue
        fi
        failure="${status/:/ }: $last_line"
        if [[ $failure == "$last_failure" ]]; then crashes=$((crashes + 1)); else crashes=1; fi
        last_failure=$failure
        if [[ $status == exited:2 ]] || ((crashes >= MAX_CRASHES)); then
          show_log "$worker" "$tail_lines"
          if [[ $status == exited:2 ]]; then
            die "the trainer on worker $worker rejected its config or input (exit status 2; see above); fix it \
and start the loop again with --adopt. $NAME is left as it is"
          fi
          die "the trainer failed $crashes times in a row the same way (worker $worker, $failure); see the \
log above. $NAME is left as it is: fix the cause and start the loop again with --adopt"
        fi
        show_log "$worker" "$tail_lines"
        count_restart "the trainer on worker $worker failed first ($failure), $crashes/$MAX_CRASHES in a row"
        continue
      fi
      if ((${#W_ID[@]} >= HOSTS && stopped == ${#W_ID[@]})); then
        run_finished && break
        # The trainer saves and exits 0 when it is sent SIGTERM (maintenance, a stop): resume.
        launched=0
        collect_logs
        count_restart "the trainer stopped after saving, without DONE"
        continue
      fi
      if ((${#W_ID[@]} < HOSTS)); then
        # A READY VM that ssh cannot reach is usually a passing hiccup; the run goes on there
        # (and the stall watchdog notices when it does not).
        unreachable=$((unreachable + 1))
        note "$(date -u +%TZ) ${#W_ID[@]} of $HOSTS workers of $NAME answered over ssh ($unreachable time(s) in a row); waiting"
      else
        unreachable=0
      fi
      if ((STALL > 0 && $(date +%s) - last_progress >= STALL)); then
        launched=0
        note "$(date -u +%TZ) no new step in the run's metrics for $(human "$STALL") (--stall-minutes): \
a hung worker or collective; collecting every worker's log and starting the run again"
        collect_logs
        quiet=$(quietest)
        [[ ${#W_ID[@]} -eq 0 ]] || show_log "${W_ID[quiet]}" "$(worker_log_tail "${W_ID[quiet]}")"
        stop_workers
        count_restart "no new step for $(human "$STALL")"
        continue
      fi
      ;;
  esac
  sleep "$POLL"
done

note "Run finished: $RUN_DIR/DONE exists"
final_state="$(vm_state)"
[[ $(state_kind "$final_state") != ok ]] || collect_logs
if ((KEEP)); then
  note "$NAME is kept (--keep); delete it with launch/delete_tpu.sh --name $NAME"
elif ((OWNED)); then
  [[ $final_state == NOT_FOUND ]] || delete_vm
else
  note "$NAME was not created by this loop: left as it is"
fi
