#!/usr/bin/env bash
# Runs ON each TPU worker (train_tpu.sh / watch_tpu.sh / spot_loop.sh call it over ssh): starts the
# training command detached from the ssh session, and reports on it. One run per worker.
#
#   tpu_worker.sh start COMMAND...  stop the previous run, start COMMAND in the code folder
#   tpu_worker.sh follow [LINES]    print the log (last LINES, default all) and follow it until
#                                   the run ends; exit with its exit status
#   tpu_worker.sh status            print "running PID", "exited RC", "killed" or "none"
#   tpu_worker.sh tail [LINES]      the log's last LINES (default 30)
#   tpu_worker.sh stop [SECONDS]    stop the run: SIGTERM to the trainer, which finishes its step,
#                                   saves and exits; SIGKILL to what is left after SECONDS
#                                   (default $PACS_JAX_STOP_GRACE, else 600: a 7B step and its save)
#   tpu_worker.sh sync TARBALL      stop the run, then unpack TARBALL (the code) into the code folder;
#                                   deletes only files an earlier sync shipped that TARBALL lacks
set -euo pipefail

CODE_DIR="${PACS_JAX_CODE_DIR:-$HOME/pacs_jax}"
STATE_DIR="${PACS_JAX_STATE_DIR:-$HOME/pacs_jax_run}"
GRACE="${PACS_JAX_STOP_GRACE:-600}"
LOG="$STATE_DIR/train.log"
PID_FILE="$STATE_DIR/train.pid"     # the detached session (bash _run): its group holds everything
CHILD_FILE="$STATE_DIR/train.child" # the training command itself, which gets the SIGTERM
RC_FILE="$STATE_DIR/train.rc"
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
  [[ -f $LOG ]] && mv "$LOG" "$LOG.1"
  rm -f "$RC_FILE" "$CHILD_FILE"
  printf '=== %s %s: %s\n' "$(date -u +%FT%TZ)" "$(hostname)" "$*" >"$LOG"
  # Not a job-control shell, so the child is no group leader and setsid makes it one in place
  # (no fork): $! is the run's pid.
  nohup setsid bash "${BASH_SOURCE[0]}" _run "$@" >>"$LOG" 2>&1 </dev/null &
  echo "$!" >"$PID_FILE"
  echo "started pid $! on $(hostname); log: $LOG"
}

# The detached body of `start`: run the command, record its pid and its exit status.
_run() {
  local rc=0 child
  cd "$CODE_DIR"
  "$@" &
  child=$!
  echo "$child" >"$CHILD_FILE"
  wait "$child" || rc=$?
  echo "$rc" >"$RC_FILE"
  printf '=== %s exited with status %s\n' "$(date -u +%FT%TZ)" "$rc"
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
  start | follow | status | stop | sync | _run)
    command=$1
    shift
    "$command" "$@"
    ;;
  tail)
    shift
    tail_log "$@"
    ;;
  *)
    echo "usage: tpu_worker.sh start COMMAND... | follow [LINES] | status | tail [LINES] | stop [SECONDS] | sync TARBALL" >&2
    exit 2
    ;;
esac
