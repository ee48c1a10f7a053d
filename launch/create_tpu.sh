#!/usr/bin/env bash
# Create a Cloud TPU VM: on-demand, spot (--spot), or through a queued resource (--queued), which
# waits in Google's queue for capacity; in queued mode this script waits until the VM is READY.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/create_tpu.sh --name NAME --type TYPE [--zone ZONE] [--project PROJECT]
                            [--spot] [--queued] [--runtime-version VERSION]
                            [--reserved] [--network NET] [--subnetwork SUBNET] [--internal-ips]
                            [--service-account EMAIL] [--scopes SCOPES] [--labels K=V,...]
                            [--metadata K=V,...] [--tags TAG,...] [--gcloud-flag FLAG ...]
                            [--wait-timeout SECONDS] [--no-wait] [--dry-run]

  --name             TPU VM name (lower-case letters, digits, '-')
  --type             accelerator type: v5litepod-8 / v4-8 (one host), v5p-64 (8 hosts), ...
  --zone, --project  default to $ZONE / $PROJECT, then to gcloud's config
  --spot             spot VM: much cheaper, can be preempted at any time (see spot_loop.sh)
  --queued           request through a queued resource (waits for capacity; combine with --spot)
  --runtime-version  TPU software image (default by type: v2-alpha-tpuv5-lite for v5litepod,
                     v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e, tpu-ubuntu2204-base for v2-v4)
  --reserved         use the project's reservation (committed capacity) in this zone
  --network, --subnetwork, --internal-ips
                     VPC placement; --internal-ips gives no external IP (then ssh needs IAP or a VM
                     in the same network, and the subnet needs Private Google Access for gs://)
  --service-account  the VMs' identity: it must read the weights/data and write the run's bucket
                     (roles/storage.objectAdmin on it); --scopes defaults to cloud-platform with it
  --labels, --metadata, --tags
                     passed to gcloud as they are (e.g. --labels team=rl,run=pacs)
  --gcloud-flag      any other create flag, passed as it is (repeatable), e.g.
                     --gcloud-flag=--boot-disk=size=200GB
  --wait-timeout     queued mode: give up waiting for READY after this many seconds (default 86400)
  --no-wait          queued mode: return once the request is queued (spot_loop.sh watches it itself)
  --dry-run          print the gcloud commands (one per line, prefixed "+ ") instead of running them
EOF
}

NAME="" TYPE="" RUNTIME="" SPOT=0 QUEUED=0 WAIT_TIMEOUT=86400 SCOPES="" WAIT=1
EXTRA=()
while (($#)); do
  case $1 in
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --type) need_value "$@"; TYPE=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE_FLAG=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT_FLAG=$2; shift 2 ;;
    --runtime-version) need_value "$@"; RUNTIME=$2; shift 2 ;;
    --wait-timeout) need_value "$@"; WAIT_TIMEOUT=$2; shift 2 ;;
    --network | --subnetwork | --service-account | --labels | --metadata | --tags)
      need_value "$@"; EXTRA+=("$1=$2"); shift 2 ;;
    --scopes) need_value "$@"; SCOPES=$2; shift 2 ;;
    --reserved | --internal-ips) EXTRA+=("$1"); shift ;;
    --gcloud-flag=*) EXTRA+=("${1#--gcloud-flag=}"); shift ;;
    --gcloud-flag)
      [[ $# -ge 2 && $2 == --* ]] || die "--gcloud-flag needs a gcloud flag, e.g. --gcloud-flag=--boot-disk=size=200GB"
      EXTRA+=("$2"); shift 2 ;;
    --spot) SPOT=1; shift ;;
    --queued) QUEUED=1; shift ;;
    --no-wait) WAIT=0; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
if [[ -n $SCOPES ]]; then
  EXTRA+=("--scopes=$SCOPES")
elif [[ " ${EXTRA[*]-} " == *" --service-account="* ]]; then
  EXTRA+=(--scopes=cloud-platform)
fi

require_name "$NAME"
require_type "$TYPE"
[[ -n $RUNTIME ]] || RUNTIME="$(default_runtime_version "$TYPE")"
[[ $WAIT_TIMEOUT =~ ^[0-9]+$ ]] || die "--wait-timeout must be a number of seconds, got '$WAIT_TIMEOUT'"
require_cloud

HOSTS="$(tpu_hosts "$TYPE")"
SPOT_FLAG=()
((SPOT)) && SPOT_FLAG=(--spot)
note "Creating $NAME: $TYPE ($HOSTS host(s), workers 0..$((HOSTS - 1))), runtime $RUNTIME, \
$( ((SPOT)) && echo spot || echo on-demand)$( ((QUEUED)) && echo ', queued'), in $ZONE_ID / $PROJECT_ID"

if ((!QUEUED)); then
  # Returns once the VM is READY (or failed).
  run gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_WHERE[@]}" \
    --accelerator-type="$TYPE" --version="$RUNTIME" ${SPOT_FLAG[@]+"${SPOT_FLAG[@]}"} ${EXTRA[@]+"${EXTRA[@]}"}
  exit 0
fi

run gcloud compute tpus queued-resources create "$NAME" "${GCLOUD_WHERE[@]}" --node-id="$NAME" \
  --accelerator-type="$TYPE" --runtime-version="$RUNTIME" ${SPOT_FLAG[@]+"${SPOT_FLAG[@]}"} ${EXTRA[@]+"${EXTRA[@]}"}

if ((!WAIT)); then
  note "$NAME is queued; watch it with launch/watch_tpu.sh --name $NAME --queued"
  exit 0
fi
if ((DRY_RUN)); then
  queued_state "$NAME" >/dev/null
  tpu_state "$NAME" >/dev/null
  note "(dry run: would poll these every 30 s until the queued resource is ACTIVE and the VM READY)"
  exit 0
fi

note "Waiting for capacity (the queued resource goes WAITING_FOR_RESOURCES -> PROVISIONING -> ACTIVE) ..."
start=$SECONDS
while :; do
  qstate="$(queued_state "$NAME")"
  case $qstate in
    ACTIVE)
      [[ "$(tpu_state "$NAME")" == READY ]] && break
      ;;
    FAILED | SUSPENDED | SUSPENDING | NOT_FOUND)
      die "queued resource $NAME is $qstate; see 'gcloud compute tpus queued-resources describe \
$NAME --zone=$ZONE_ID --project=$PROJECT_ID', then delete it with launch/delete_tpu.sh --queued"
      ;;
  esac
  ((SECONDS - start < WAIT_TIMEOUT)) ||
    die "$NAME still $qstate after $WAIT_TIMEOUT s; it stays queued: delete it with launch/delete_tpu.sh --queued"
  note "  $(date -u +%TZ) $qstate"
  sleep "${PACS_LAUNCH_POLL_SECONDS:-30}"
done
note "$NAME is READY"
