#!/usr/bin/env bash
# Show a TPU VM's state and its training status, then tail (and follow) a worker's training log.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/watch_tpu.sh --name NAME [--zone ZONE] [--project PROJECT] [--queued]
                           [--worker N] [--lines N] [--no-follow] [--dry-run]

  --queued     also show the queued resource's state (VMs made with create_tpu.sh --queued)
  --worker     whose log to show (default 0: process 0 is the one that logs metrics)
  --lines      show the last N lines (default 50), then follow until training ends
  --no-follow  print the last lines and return
  --dry-run    print the gcloud commands (one per line, prefixed "+ ") instead of running them
EOF
}

NAME="" QUEUED=0 WORKER=0 LINES=50 FOLLOW=1
while (($#)); do
  case $1 in
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE_FLAG=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT_FLAG=$2; shift 2 ;;
    --worker) need_value "$@"; WORKER=$2; shift 2 ;;
    --lines) need_value "$@"; LINES=$2; shift 2 ;;
    --queued) QUEUED=1; shift ;;
    --no-follow) FOLLOW=0; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

require_name "$NAME"
[[ $WORKER =~ ^[0-9]+$ ]] || die "--worker must be a worker number (0, 1, ...), got '$WORKER'"
[[ $LINES =~ ^[0-9]+$ ]] || die "--lines must be a number, got '$LINES'"
require_cloud

((QUEUED)) && echo "queued resource: $(queued_state "$NAME")"
echo "TPU VM: $(tpu_state "$NAME")"
if ((FOLLOW)); then
  remote="$REMOTE_WORKER status; $REMOTE_WORKER follow $LINES"
else
  remote="$REMOTE_WORKER status; tail -n $LINES \$HOME/pacs_jax_run/train.log"
fi
run gcloud compute tpus tpu-vm ssh "$NAME" --worker="$WORKER" "${GCLOUD_WHERE[@]}" --command="$remote"
