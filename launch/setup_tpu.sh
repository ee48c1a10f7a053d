#!/usr/bin/env bash
# Install the project on every worker of a TPU VM: copy the working tree (the run going on there is
# stopped first, gracefully), make a Python 3.11 venv (TPU images ship 3.10; uv fetches 3.11), pip
# install -e '.[tpu]' with constraints.txt's pins plus launch/requirements-worker.txt (gcsfs for
# gs://, datasets), then run --setup-command if given. Safe to run again.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/setup_tpu.sh --name NAME [--zone ZONE] [--project PROJECT] [--setup-command CMD]
                           [--with-wandb] [--dry-run]

Runs on all workers at once (--worker=all), so one host (v5litepod-8, v4-8) and many hosts
(v5p-64: 8 workers) are set up alike. Re-running it re-syncs the code and re-installs (quick).
  --zone, --project  default to $ZONE / $PROJECT, then to gcloud's config
  --setup-command    a shell command run on every worker after the install, in the code folder with
                     the venv's python first on PATH (e.g. to fetch data the config names by a
                     local path); gs:// model.path / data paths need none (the trainer copies them)
  --with-wandb       also install wandb (for configs with trainer.wandb: true; spot_loop.sh and
                     paper_recipe.sh pass it when the config or an override turns wandb on)
  --dry-run          print the gcloud commands (one per line, prefixed "+ ") instead of running them
EOF
}

NAME="" SETUP_COMMAND="" WANDB=0
while (($#)); do
  case $1 in
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE_FLAG=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT_FLAG=$2; shift 2 ;;
    --setup-command) need_value "$@"; SETUP_COMMAND=$2; shift 2 ;;
    --with-wandb) WANDB=1; shift ;;
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
$REMOTE_VENV/bin/python -m pip install -q -c constraints.txt -e '.[tpu]'; \
$REMOTE_VENV/bin/python -m pip install -q -r launch/requirements-worker.txt; \
$(if ((WANDB)); then echo "$REMOTE_VENV/bin/python -m pip install -q $WANDB_REQUIREMENT; "; fi)\
$REMOTE_VENV/bin/python -c 'import jax, gcsfs, pacs_jax; print(\"jax\", jax.__version__, \"ok\")'"
if [[ -n $SETUP_COMMAND ]]; then
  install+="; cd $REMOTE_CODE; PATH=$REMOTE_VENV/bin:\$PATH; $SETUP_COMMAND"
fi

note "Installing pacs_jax, jax[tpu], gcsfs and datasets on every worker of $NAME ..."
run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${GCLOUD_WHERE[@]}" --command="$install"
note "$NAME is set up: start training with launch/train_tpu.sh --name $NAME --config CFG"
