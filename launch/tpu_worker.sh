#!/usr/bin/env bash
# Runs ON each TPU worker (train_tpu.sh / watch_tpu.sh / spot_loop.sh call it over ssh): starts the
# training command detached from the ssh session, and reports on it. One run per worker.
#
#   tpu_worker.sh start COMMAND...  stop the previous run, start COMMAND in the code folder
#   tpu_worker.sh follow [LINES]    print the log (last LINES, default all) and follow it until
#                                   the run ends; exit with its exit status
#   tpu_worker.sh status            print "running PID", "exited RC", "killed" or "none"
#   tpu_worker.sh report            one line for spot_loop.sh, which asks every worker at once:
#                                   "pacs_worker ID STATUS ENDED IDLE STEPS": this worker's number,
#                                   running / exited:RC / killed / none, when the run ended (epoch
#                                   s, or -), seconds since its log last changed (or -), and the
#                                   steps in the run's metrics.jsonl here (worker 0's; - elsewhere)
#   tpu_worker.sh upload [RUN_DIR]  copy this worker's logs to RUN_DIR/logs/worker-ID/ and the
#                                   run's rollouts/ to RUN_DIR/rollouts/ (default: the run's own
#                                   trainer.run_dir, given at start as PACS_JAX_RUN_DIR)
#   tpu_worker.sh tail [LINES]      the log's last LINES (default 30)
#   tpu_worker.sh stop [SECONDS]    stop the run: SIGTERM to the trainer, which finishes its step,
#                                   saves and exits; SIGKILL to what is left after SECONDS
#                                   (default $PACS_JAX_STOP_GRACE, else 600: a 7B step and its save)
#   tpu_worker.sh sync TARBALL      stop the run, then unpack TARBALL (the code) into the code folder;
#                                   deletes only files an earlier sync shipped that TARBALL lacks
#
# Environment: PACS_JAX_RUN_DIR (start: the run's trainer.run_dir; a gs:// one gets this worker's
# log every PACS_JAX_LOG_UPLOAD_SECONDS, default 600, and when the run ends), PACS_JAX_ENV_FILE
# (start: a file of KEY=VALUE lines exported to the trainer: WANDB_API_KEY, HF_TOKEN, ...),
# PACS_JAX_KEEP_LOGS (previous train.log files kept, default 5), PACS_JAX_WORKER_ID (this worker's
# number; default: the TPU metadata's agent-worker-number).
set -euo pipefail

CODE_DIR="${PACS_JAX_CODE_DIR:-$HOME/pacs_jax}"
STATE_DIR="${PACS_JAX_STATE_DIR:-$HOME/pacs_jax_run}"
GRACE="${PACS_JAX_STOP_GRACE:-600}"
LOG="$STATE_DIR/train.log"
PID_FILE="$STATE_DIR/train.pid"     # the detached session (bash _run): its group holds everything
CHILD_FILE="$STATE_DIR/train.child" # the training command itself, which gets the SIGTERM
RC_FILE="$STATE_DIR/train.rc"
RUN_DIR_FILE="$STATE_DIR/run_dir" # the run's trainer.run_dir (PACS_JAX_RUN_DIR at start)
KEEP_LOGS="${PACS_JAX_KEEP_LOGS:-5}"
UPLOAD_SECONDS="${PACS_JAX_LOG_UPLOAD_SECONDS:-600}"
MANIFEST=.pacs_jax_files            # in CODE_DIR: the files the last sync shipped

running_pid() {
  local pid
  [[ -f $PID_FILE ]] || return 1
  pid="$(<"$PID_FILE")"
  kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

stop() {
  local grace=${1:-$GRACE} pid child waited=0
  [[ $grace =~ ^[0-9]+$ ]] || {
    echo "tpu_worker.sh stop: the grace period must be a number of seconds, got '$grace'" >&2
    return 2
  }
  pid="$(running_pid)" || return 0
  # Only the trainer gets SIGTERM: its reward-checking processes must live until it has finished
  # its step and saved. Whatever is left of the session after the grace period is killed.
  child="$(cat "$CHILD_FILE" 2>/dev/null || true)"
  while [[ -z $child ]] && ((waited < 20)); do # a run started a moment ago may not have written it yet
    sleep 0.1
    waited=$((waited + 1))
    child="$(cat "$CHILD_FILE" 2>/dev/null || true)"
  done
  waited=0
  echo "stopping pid ${child:-$pid} on $(hostname): SIGTERM, SIGKILL after $grace s if still running"
  if [[ -n $child ]] && kill -0 "$child" 2>/dev/null; then
    kill -TERM "$child" 2>/dev/null || true
  else
    kill -TERM -- "-$pid" 2>/dev/null || true
  fi
  while kill -0 "$pid" 2>/dev/null && ((waited < grace)); do
    sleep 1
    waited=$((waited + 1))
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "pid $pid still running after $grace s: SIGKILL" >&2
  fi
  kill -KILL -- "-$pid" 2>/dev/null || true
  waited=0
  while kill -0 "$pid" 2>/dev/null && ((waited < 50)); do
    sleep 0.1
    waited=$((waited + 1))
  done
}

start() {
  (($#)) || {
    echo "tpu_worker.sh start: no command given" >&2
    return 2
  }
  stop
  # A killed TPU process can leave libtpu's lock behind, which makes the next one fail with
  # "TPU in use"; our own process is gone now, so the lock is stale.
  rm -f /tmp/libtpu_lockfile
  mkdir -p "$STATE_DIR"
  rotate_logs
  rm -f "$RC_FILE" "$CHILD_FILE"
  printf '%s\n' "${PACS_JAX_RUN_DIR:-}" >"$RUN_DIR_FILE"
  printf '=== %s %s: %s\n' "$(date -u +%FT%TZ)" "$(hostname)" "$*" >"$LOG"
  # Not a job-control shell, so the child is no group leader and setsid makes it one in place
  # (no fork): $! is the run's pid.
  nohup setsid bash "${BASH_SOURCE[0]}" _run "$@" >>"$LOG" 2>&1 </dev/null &
  echo "$!" >"$PID_FILE"
  echo "started pid $! on $(hostname); log: $LOG"
}

# The detached body of `start`: run the command, record its pid and its exit status.
_run() {
  local rc=0 child uploader=""
  cd "$CODE_DIR"
  if [[ -n ${PACS_JAX_ENV_FILE:-} && -f ${PACS_JAX_ENV_FILE/#\~/$HOME} ]]; then
    set -a # every KEY=VALUE of the file is exported to the trainer
    # shellcheck disable=SC1090
    source "${PACS_JAX_ENV_FILE/#\~/$HOME}"
    set +a
  fi
  "$@" &
  child=$!
  echo "$child" >"$CHILD_FILE"
  if [[ ${PACS_JAX_RUN_DIR:-} == gs://* ]] && ((UPLOAD_SECONDS > 0)); then
    # The log goes to the bucket now and then, so what a preempted VM printed is not lost with it.
    (while sleep "$UPLOAD_SECONDS"; do upload >/dev/null 2>&1 || true; done) &
    uploader=$!
  fi
  wait "$child" || rc=$?
  echo "$rc" >"$RC_FILE"
  printf '=== %s exited with status %s\n' "$(date -u +%FT%TZ)" "$rc"
  [[ -z $uploader ]] || { kill "$uploader" 2>/dev/null || true; upload >/dev/null 2>&1 || true; }
}

# train.log -> train.log.1 -> ... -> train.log.$KEEP_LOGS (the oldest goes).
rotate_logs() {
  local i
  [[ -f $LOG ]] || return 0
  for ((i = KEEP_LOGS; i > 1; i--)); do
    [[ -f $LOG.$((i - 1)) ]] && mv -f "$LOG.$((i - 1))" "$LOG.$i"
  done
  if ((KEEP_LOGS > 0)); then mv -f "$LOG" "$LOG.1"; else rm -f "$LOG"; fi
}

# This worker's number in the slice: $PACS_JAX_WORKER_ID, else the TPU metadata's
# agent-worker-number (what JAX reads too), else the host name.
worker_id() {
  local id="${PACS_JAX_WORKER_ID:-}"
  if [[ -z $id ]]; then
    id="$(curl -s -m 2 -H 'Metadata-Flavor: Google' \
      http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number 2>/dev/null || true)"
  fi
  [[ $id =~ ^[0-9]+$ ]] || id="$(hostname)"
  echo "$id"
}

# The run's trainer.run_dir, as given at start.
run_dir() {
  cat "$RUN_DIR_FILE" 2>/dev/null || true
}

# The folder the trainer writes the run's logs to on this machine: a gs:// run keeps a mirror under
# $PACS_JAX_LOCAL_RUNS (pacs_jax/run_files.py local_run_dir: gs://B/runs/x -> B__runs__x).
local_run_dir() {
  local dir=$1 mirror
  if [[ $dir == gs://* ]]; then
    mirror=${dir#gs://}
    mirror=${mirror%/}
    echo "${PACS_JAX_LOCAL_RUNS:-$HOME/pacs_jax_runs}/${mirror//\//__}"
  elif [[ -n $dir && $dir != /* ]]; then
    echo "$CODE_DIR/$dir"
  else
    echo "$dir"
  fi
}

report() {
  local id state ended=- idle=- steps=- metrics dir
  id="$(worker_id)"
  state="$(status)"
  state=${state% *}                                          # "running PID" -> running
  [[ $state == exited ]] && state="exited:$(<"$RC_FILE")" && ended="$(stat -c %Y "$RC_FILE")"
  [[ -f $LOG ]] && idle=$(($(date +%s) - $(stat -c %Y "$LOG")))
  dir="$(run_dir)"
  if [[ -n $dir ]]; then
    metrics="$(local_run_dir "$dir")/metrics.jsonl"
    [[ -f $metrics ]] && steps="$(wc -l <"$metrics" | tr -d ' ')"
  fi
  echo "pacs_worker $id $state $ended $idle $steps"
}

upload() {
  local dest=${1:-$(run_dir)} id rollouts
  [[ -n $dest ]] || {
    echo "tpu_worker.sh upload: no run directory given and none recorded at start" >&2
    return 2
  }
  dest=${dest%/}
  id="$(worker_id)"
  shopt -s nullglob
  local logs=("$LOG" "$LOG".*)
  shopt -u nullglob
  ((${#logs[@]} == 0)) || gcloud storage cp "${logs[@]}" "$dest/logs/worker-$id/"
  rollouts="$(local_run_dir "$(run_dir)")/rollouts"
  # (A local run directory holds its rollouts already.)
  if [[ -d $rollouts ]] && [[ $dest == gs://* || $(local_run_dir "$dest") != "${rollouts%/rollouts}" ]]; then
    gcloud storage rsync -r "$rollouts" "$dest/rollouts"
  fi
}

status() {
  local pid
  if pid="$(running_pid)"; then
    echo "running $pid"
  elif [[ -f $RC_FILE ]]; then
    echo "exited $(<"$RC_FILE")"
  elif [[ -f $PID_FILE ]]; then
    echo "killed"
  else
    echo "none"
  fi
}

tail_log() {
  [[ -f $LOG ]] || return 0
  tail -n "${1:-30}" "$LOG"
}

follow() {
  local lines=${1:-+1} pid
  [[ -f $LOG ]] || {
    echo "no training log at $LOG (nothing started on $(hostname))" >&2
    return 1
  }
  if pid="$(running_pid)"; then
    tail -n "$lines" -F --pid="$pid" "$LOG" 2>/dev/null
  else
    tail -n "$lines" "$LOG"
  fi
  [[ -f $RC_FILE ]] || {
    echo "the training process ended without recording an exit status (killed?)" >&2
    return 1
  }
  return "$(<"$RC_FILE")"
}

sync() {
  local tarball=${1:-}
  [[ -f $tarball ]] || {
    echo "tpu_worker.sh sync: no code archive at '$tarball'" >&2
    return 2
  }
  stop
  mkdir -p "$CODE_DIR"
  tar -tzf "$tarball" | grep -v '/$' | LC_ALL=C sort >"$CODE_DIR/$MANIFEST.new"
  if [[ -f $CODE_DIR/$MANIFEST ]]; then
    LC_ALL=C comm -23 "$CODE_DIR/$MANIFEST" "$CODE_DIR/$MANIFEST.new" | while IFS= read -r path; do
      rm -f -- "${CODE_DIR:?}/$path"
    done
  fi
  tar -xzf "$tarball" -C "$CODE_DIR"
  mv "$CODE_DIR/$MANIFEST.new" "$CODE_DIR/$MANIFEST"
  echo "code in $CODE_DIR updated on $(hostname) ($(wc -l <"$CODE_DIR/$MANIFEST") files)"
}

case ${1:-} in
  start | follow | status | report | upload | stop | sync | _run)
    command=$1
    shift
    "$command" "$@"
    ;;
  tail)
    shift
    tail_log "$@"
    ;;
  *)
    echo "usage: tpu_worker.sh start COMMAND... | follow [LINES] | status | report | upload [RUN_DIR] | tail [LINES] | stop [SECONDS] | sync TARBALL" >&2
    exit 2
    ;;
esac
