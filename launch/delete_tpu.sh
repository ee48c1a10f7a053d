#!/usr/bin/env bash
# Delete a TPU VM, or a queued resource together with its VM (--queued). Asks first unless --yes.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/delete_tpu.sh --name NAME [--zone ZONE] [--project PROJECT] [--queued] [--yes] [--dry-run]

  --queued   NAME is a queued resource (create_tpu.sh --queued): delete it and its VM
  --yes      do not ask (needed when there is no terminal to ask on)
  --dry-run  print the gcloud commands (one per line, prefixed "+ ") instead of running them
The run's files on gs:// stay; only the VM (and its local disk) goes.
EOF
}

NAME="" QUEUED=0 YES=0
while (($#)); do
  case $1 in
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE_FLAG=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT_FLAG=$2; shift 2 ;;
    --queued) QUEUED=1; shift ;;
    --yes | -y) YES=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

require_name "$NAME"
require_cloud

what="TPU VM $NAME"
((QUEUED)) && what="queued resource $NAME and its TPU VM"
if ((!DRY_RUN && !YES)); then
  [[ -t 0 ]] || die "not deleting the $what without asking: pass --yes (there is no terminal to ask on)"
  read -r -p "Delete the $what in $ZONE_ID / $PROJECT_ID, with its disk? [y/N] " answer
  [[ $answer == [yY] || $answer == [yY][eE][sS] ]] || die "not deleted"
fi

if ((QUEUED)); then
  # --force deletes the VM the queued resource made as well.
  run gcloud compute tpus queued-resources delete "$NAME" "${GCLOUD_WHERE[@]}" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_WHERE[@]}" --quiet
fi
