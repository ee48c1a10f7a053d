# shellcheck shell=bash disable=SC2034
# Helpers shared by the launch/ scripts (sourced, never run): flags common to every script,
# dry-run printing, project / zone / gcloud checks, TPU facts and copying the code to workers.

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$LAUNCH_DIR/.." && pwd)"

# Where things live on every TPU worker, under the worker's $HOME (written as \$HOME so that the
# worker's shell expands it, not ours). The scripts that source this file use these.
# shellcheck disable=SC2016
REMOTE_CODE='$HOME/pacs_jax'        # the synced working tree
# shellcheck disable=SC2016
REMOTE_VENV='$HOME/pacs_venv'       # Python 3.11 venv (TPU images ship Python 3.10)
REMOTE_WORKER="bash $REMOTE_CODE/launch/tpu_worker.sh"
REMOTE_PYTHON_VERSION=3.11
# Installed on the workers only for a run that logs to Weights & Biases (setup_tpu.sh --with-wandb).
WANDB_REQUIREMENT=wandb==0.31.0

# Whether a config file or key=value overrides turn trainer.wandb on (a look at the YAML text, so
# that this machine needs no Python packages): wants_wandb CONFIG [OVERRIDE...]
wants_wandb() {
  local config=$1 override on=1
  shift
  [[ -f $REPO_ROOT/$config ]] && grep -Eq '^[[:space:]]+wandb:[[:space:]]*(true|True|yes|on)\b' "$REPO_ROOT/$config" && on=0
  for override in "$@"; do
    [[ $override =~ ^trainer\.wandb=(true|True|yes|on|1)$ ]] && on=0
    [[ $override =~ ^trainer\.wandb=(false|False|no|off|0)$ ]] && on=1
  done
  return $on
}

DRY_RUN=0
PROJECT_FLAG=""
ZONE_FLAG=""
PROJECT_ID=""
ZONE_ID=""
GCLOUD_WHERE=()

# Dry-run lines go to fd 3 (our stdout), so they show even from inside $(...).
exec 3>&1

die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

note() {
  printf '%s\n' "$*" >&2
}

# `$1 VALUE` flag parsing: fail clearly when the value is missing.
need_value() {
  [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "$1 needs a value (see --help)"
}

# One shell-quoted line for a command, copy-pasteable: plain words stay bare.
quote_args() {
  local out="" arg sq="'\\''"
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+=" $arg"
    else
      out+=" '${arg//\'/$sq}'"
    fi
  done
  printf '%s\n' "${out# }"
}

# Run a command, or only print it ("+ cmd") under --dry-run (where it outputs nothing).
run() {
  if ((DRY_RUN)); then
    printf '+ %s\n' "$(quote_args "$@")" >&3
  else
    "$@"
  fi
}

have_gcloud() {
  command -v gcloud >/dev/null 2>&1
}

require_gcloud() {
  ((DRY_RUN)) || have_gcloud || die "gcloud is not installed (not found on PATH). Install the \
Google Cloud CLI (https://cloud.google.com/sdk/docs/install) and run 'gcloud auth login', or \
pass --dry-run to only print the commands."
}

# Project: --project, else $PROJECT, else $CLOUDSDK_CORE_PROJECT, else gcloud's default.
resolve_project() {
  PROJECT_ID="${PROJECT_FLAG:-${PROJECT:-${CLOUDSDK_CORE_PROJECT:-}}}"
  if [[ -z $PROJECT_ID ]] && have_gcloud; then
    PROJECT_ID="$(gcloud config get-value project 2>/dev/null || true)"
  fi
  [[ -n $PROJECT_ID ]] || die "no GCP project given. Pass --project PROJECT_ID, or \
'export PROJECT=PROJECT_ID', or run 'gcloud config set project PROJECT_ID'."
}

# Zone: --zone, else $ZONE, else $CLOUDSDK_COMPUTE_ZONE, else gcloud's default.
resolve_zone() {
  ZONE_ID="${ZONE_FLAG:-${ZONE:-${CLOUDSDK_COMPUTE_ZONE:-}}}"
  if [[ -z $ZONE_ID ]] && have_gcloud; then
    ZONE_ID="$(gcloud config get-value compute/zone 2>/dev/null || true)"
  fi
  [[ -n $ZONE_ID ]] || die "no zone given. Pass --zone ZONE (e.g. --zone us-west4-a), or \
'export ZONE=ZONE', or run 'gcloud config set compute/zone ZONE'."
}

# Everything a gcloud call needs before it runs: the binary, the project and the zone.
require_cloud() {
  require_gcloud
  resolve_project
  resolve_zone
  GCLOUD_WHERE=(--zone="$ZONE_ID" --project="$PROJECT_ID")
}

require_name() {
  [[ -n ${1:-} ]] || die "--name is required (the TPU VM's name, e.g. --name pacs-v5e)"
  [[ $1 =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "--name '$1' is not a valid TPU name: lower-case letters, digits and '-', starting with a letter"
}

# Runtime image for an accelerator type (gcloud compute tpus tpu-vm versions list).
default_runtime_version() {
  case $1 in
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    *) return 1 ;;
  esac
}

# Hosts (workers) in a slice. v2-v4 and v5p count TensorCores (2 per chip, 4 chips per host;
# v2/v3: 8 cores per host); v5e / v6e count chips (one host up to 8 chips, else 4 per host).
tpu_hosts() {
  local family=${1%-*} size=${1##*-}
  case $family in
    v2 | v3) echo $(((size + 7) / 8)) ;;
    v4 | v5p) echo $(((size / 2 + 3) / 4)) ;;
    v5litepod | v6e) if ((size <= 8)); then echo 1; else echo $((size / 4)); fi ;;
    *) return 1 ;;
  esac
}

# A training config must be a file inside the repository: the workers get a copy of the repository.
require_config() {
  [[ -n ${1:-} ]] || die "--config is required (e.g. --config configs/qwen2.5_7b_pacs.yaml)"
  [[ $1 != /* ]] || die "--config must be a path relative to the repository root (the workers \
get a copy of the repository, not of other folders), got '$1'"
  if [[ ! -f $REPO_ROOT/$1 ]]; then
    ((DRY_RUN)) || die "--config $1: no such file under $REPO_ROOT"
    note "warning: --config $1 does not exist under $REPO_ROOT (dry run goes on)"
  fi
}

require_type() {
  [[ -n ${1:-} ]] || die "--type is required (e.g. --type v5litepod-8, v4-8 or v5p-64)"
  [[ $1 =~ ^(v2|v3|v4|v5p|v5litepod|v6e)-[0-9]+$ ]] ||
    die "--type '$1' is not a TPU accelerator type: use e.g. v5litepod-8, v4-8, v5p-64 or v6e-8"
}

# How long to wait between tries of a `gcloud ... describe` that failed for another reason than
# NOT_FOUND (a network blip, a token refresh): DESCRIBE_RETRY_SECONDS, then twice that, ...
DESCRIBE_TRIES=${PACS_LAUNCH_DESCRIBE_TRIES:-5}
DESCRIBE_RETRY_SECONDS=${PACS_LAUNCH_RETRY_SECONDS:-10}

# `gcloud compute tpus KIND describe NAME --format=FORMAT` with retries. Prints the value, NOT_FOUND
# when gcloud says the resource does not exist, or UNKNOWN when every try failed otherwise (the
# caller must then wait and look again, never delete or recreate on it).
describe_with_retries() {
  local kind=$1 name=$2 format=$3 value err try=1 pause=$DESCRIBE_RETRY_SECONDS
  err="$(mktemp)"
  while :; do
    if value="$(gcloud compute tpus "$kind" describe "$name" "${GCLOUD_WHERE[@]}" \
      --format="$format" 2>"$err")"; then
      rm -f "$err"
      echo "${value:-UNKNOWN}"
      return
    fi
    if grep -qE 'NOT_FOUND|was not found|does not exist' "$err"; then
      rm -f "$err"
      echo NOT_FOUND
      return
    fi
    if ((try >= DESCRIBE_TRIES)); then
      note "warning: gcloud compute tpus $kind describe $name failed $try times: $(tail -n 1 "$err")"
      rm -f "$err"
      echo UNKNOWN
      return
    fi
    note "  gcloud compute tpus $kind describe $name failed ($(tail -n 1 "$err")); retrying in $pause s"
    sleep "$pause"
    try=$((try + 1))
    pause=$((pause * 2))
  done
}

# The TPU VM's state (READY, CREATING, PREEMPTED, TERMINATED, REPAIRING, ...), NOT_FOUND, UNKNOWN
# (describe kept failing), or "(dry run)".
tpu_state() {
  if ((DRY_RUN)); then
    run gcloud compute tpus tpu-vm describe "$1" "${GCLOUD_WHERE[@]}" --format='value(state)'
    echo "(dry run)"
    return
  fi
  describe_with_retries tpu-vm "$1" 'value(state)'
}

# The queued resource's state (ACCEPTED, PROVISIONING, WAITING_FOR_RESOURCES, ACTIVE, SUSPENDED,
# FAILED, ...), NOT_FOUND, UNKNOWN, or "(dry run)".
queued_state() {
  if ((DRY_RUN)); then
    run gcloud compute tpus queued-resources describe "$1" "${GCLOUD_WHERE[@]}" \
      --format='value(state.state)'
    echo "(dry run)"
    return
  fi
  describe_with_retries queued-resources "$1" 'value(state.state)'
}

# What a state means for a loop that keeps a VM alive: "ok" (READY / ACTIVE), "wait" (it is on its
# way there or back: creating, repairing, restarting, queued for capacity, or describe kept
# failing), or "gone" (preempted, terminated, suspended, failed, deleted: only a new VM helps).
state_kind() {
  case $1 in
    READY | ACTIVE) echo ok ;;
    CREATING | STARTING | RESTARTING | REPAIRING | REIMAGING | UNHIDING | ACCEPTED | PROVISIONING | \
      WAITING_FOR_RESOURCES | UNKNOWN | "(dry run)") echo wait ;;
    *) echo gone ;; # PREEMPTED TERMINATED STOPPED STOPPING DELETING HIDDEN SUSPENDING SUSPENDED FAILED NOT_FOUND
  esac
}

# Files to ship: tracked and untracked-but-not-ignored ones (no .git, runs/, caches, weights).
pack_repo() {
  local out=$1
  if ((DRY_RUN)); then
    printf '+ %s\n' "git -C $REPO_ROOT ls-files -z --cached --others --exclude-standard \
| tar -czf $out -C $REPO_ROOT --null -T -" >&3
    return
  fi
  if git -C "$REPO_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' path; do
        # A tracked file deleted in the working tree is still listed; tar would fail on it.
        [[ -e $REPO_ROOT/$path ]] && printf '%s\0' "$path"
      done |
      tar -czf "$out" -C "$REPO_ROOT" --null -T -
  else
    # Top-level names without a leading ./, as git's listing has them.
    (cd "$REPO_ROOT" && find . -mindepth 1 -maxdepth 1 ! -name .git ! -name runs ! -name models \
      ! -name '*.egg-info' -printf '%P\0' |
      tar -czf "$out" --exclude=__pycache__ --null -T -)
  fi
}

# Copy the working tree to $REMOTE_CODE on every worker (tpu_worker.sh sync, taken from the new
# copy itself): the run going on there is stopped first (gracefully, so it saves), and only files
# an earlier sync shipped and the working tree no longer has are deleted; anything else in that
# folder (a models/ folder, runs/) stays. Needs require_cloud first.
sync_code() {
  local name=$1 tarball
  tarball="${TMPDIR:-/tmp}/pacs_jax_code.$$.tar.gz"
  note "Copying the code to every worker of $name ..."
  pack_repo "$tarball"
  run gcloud compute tpus tpu-vm scp "$tarball" "$name:pacs_jax_code.tar.gz" \
    --worker=all "${GCLOUD_WHERE[@]}"
  run gcloud compute tpus tpu-vm ssh "$name" --worker=all "${GCLOUD_WHERE[@]}" \
    --command="set -e; tar -xzOf \$HOME/pacs_jax_code.tar.gz launch/tpu_worker.sh > \$HOME/.pacs_jax_sync.sh; \
PACS_JAX_STOP_GRACE=${PACS_JAX_STOP_GRACE:-600} bash \$HOME/.pacs_jax_sync.sh sync \$HOME/pacs_jax_code.tar.gz"
  ((DRY_RUN)) || rm -f "$tarball"
}
