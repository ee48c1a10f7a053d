#!/usr/bin/env bash
# Runs ON each TPU worker (train_tpu.sh / watch_tpu.sh / spot_loop.sh call it over ssh): starts the
# training command detached from the ssh session, and reports on it. One run per worker.
#
#   tpu_worker.sh start COMMAND...  stop the previous run, start COMMAND in the code folder
#   tpu_worker.sh follow [LINES]    print the log (last LINES, default all) and follow it until
#                                   the run ends; exit with its exit status
#   tpu_worker.sh status            print "running PID", "exited RC", "killed" or "none"
#   tpu_worker.sh stop              stop the run (SIGTERM, then SIGKILL after 30 s)
set -euo pipefail

CODE_DIR="${PACS_JAX_CODE_DIR:-$HOME/pacs_jax}"
STATE_DIR="${PACS_JAX_STATE_DIR:-$HOME/pacs_jax_run}"
LOG="$STATE_DIR/train.log"
PID_FILE="$STATE_DIR/train.pid"
RC_FILE="$STATE_DIR/train.rc"

running_pid() {
  local pid
  [[ -f $PID_FILE ]] || return 1
  pid="$(<"$PID_FILE")"
  kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

stop() {
  local pid waited=0
  pid="$(running_pid)" || return 0
  # The run is a session leader (setsid), so its process group holds python and its children.
  kill -TERM -- "-$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null && ((waited < 30)); do
    sleep 1
    waited=$((waited + 1))
  done
  kill -KILL -- "-$pid" 2>/dev/null || true
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
  rm -f "$RC_FILE"
  printf '=== %s %s: %s\n' "$(date -u +%FT%TZ)" "$(hostname)" "$*" >"$LOG"
  # Not a job-control shell, so the child is no group leader and setsid makes it one in place
  # (no fork): $! is the run's pid.
  nohup setsid bash "${BASH_SOURCE[0]}" _run "$@" >>"$LOG" 2>&1 </dev/null &
  echo "$!" >"$PID_FILE"
  echo "started pid $! on $(hostname); log: $LOG"
}

# The detached body of `start`: run the command, record its exit status.
_run() {
  local rc=0
  cd "$CODE_DIR"
  "$@" || rc=$?
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

case ${1:-} in
  start | follow | status | stop | _run)
    command=$1
    shift
    "$command" "$@"
    ;;
  *)
    echo "usage: tpu_worker.sh start COMMAND... | follow [LINES] | status | stop" >&2
    exit 2
    ;;
esac
