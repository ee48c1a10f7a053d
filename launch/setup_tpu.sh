#!/usr/bin/env bash
# Install the project on every worker of a TPU VM: copy the working tree, make a Python 3.11 venv
# (TPU images ship 3.10; uv fetches 3.11), pip install -e . "jax[tpu]". Safe to run again.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/setup_tpu.sh --name NAME [--zone ZONE] [--project PROJECT] [--dry-run]

Runs on all workers at once (--worker=all), so one host (v5litepod-8, v4-8) and many hosts
(v5p-64: 8 workers) are set up alike. Re-running it re-syncs the code and re-installs (quick).
  --zone, --project  default to $ZONE / $PROJECT, then to gcloud's config
  --dry-run          print the gcloud commands (one per line, prefixed "+ ") instead of running them
EOF
}

NAME=""
while (($#)); do
  case $1 in
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE_FLAG=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT_FLAG=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

require_name "$NAME"
require_cloud

sync_code "$NAME"

# pip --user may need --break-system-packages on newer (PEP 668) images; uv only provides Python.
install="set -e; cd $REMOTE_CODE; export PATH=\$HOME/.local/bin:\$PATH; \
command -v uv >/dev/null || python3 -m pip install -q --user uv \
|| python3 -m pip install -q --user --break-system-packages uv; \
[ -x $REMOTE_VENV/bin/python ] || uv venv --seed --python $REMOTE_PYTHON_VERSION $REMOTE_VENV; \
$REMOTE_VENV/bin/python -m pip install -q -U pip; \
$REMOTE_VENV/bin/python -m pip install -q -e . \"jax[tpu]\"; \
$REMOTE_VENV/bin/python -c 'import jax, pacs_jax; print(\"jax\", jax.__version__, \"ok\")'"

note "Installing pacs_jax and jax[tpu] on every worker of $NAME ..."
run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${GCLOUD_WHERE[@]}" --command="$install"
note "$NAME is set up: start training with launch/train_tpu.sh --name $NAME --config CFG"
