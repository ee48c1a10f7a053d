#!/usr/bin/env bash
# A newcomer's first command: install the project (into .venv unless a virtual environment is
# active; scripts/python_env.sh) and train the tiny debug config on the CPU
# (a few minutes on a laptop; macOS's bash 3.2 works too). Extra arguments are config
# overrides, e.g. trainer.total_steps=5.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/cpu_debug.sh [--no-install] [--dry-run] [key=value ...]

Installs the project (pip install -e . with constraints.txt's pinned versions) into a
virtual environment and runs
  python -m pacs_jax train --config configs/debug_cpu.yaml [key=value ...]
  --no-install  skip the pip install (already done): uses $PYTHON, the active virtual
                environment, .venv, or else the system python
  --dry-run     print the commands instead of running them
The environment: $PYTHON when set, else the active virtual environment ($VIRTUAL_ENV), else
$PACS_JAX_VENV (default: .venv in the repository, created when missing).
EOF
}

INSTALL=1
OVERRIDES=()
while (($#)); do
  case $1 in
    --no-install) INSTALL=0; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; OVERRIDES+=("$@"); break ;;
    --*) die "unknown argument '$1' (see --help)" ;;
    *) OVERRIDES+=("$1"); shift ;;
  esac
done

cd "$REPO_ROOT"
# shellcheck source=scripts/python_env.sh
source scripts/python_env.sh
if ((DRY_RUN)); then
  PY=${PYTHON:-${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}}
  PY=${PY:-${PACS_JAX_VENV:-$REPO_ROOT/.venv}/bin/python}
elif ((INSTALL)); then
  choose_python || exit 1
else
  choose_python existing || exit 1
  # --no-install promises the dependencies are there: say what to do before anything starts.
  "$PY" -c 'import jax, flax, optax, orbax.checkpoint, transformers, math_verify' 2>/dev/null \
    || die "$PY lacks the project's dependencies: run without --no-install (installs into .venv), or set PYTHON to the interpreter you installed them in"
fi
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"

if ((INSTALL)); then
  if ((DRY_RUN)); then
    run "$PY" -m pip install -q -c constraints.txt -e .
  else
    pip_install -e .
  fi
fi
run "$PY" -m pacs_jax train --config configs/debug_cpu.yaml ${OVERRIDES[@]+"${OVERRIDES[@]}"}

run_dir="$("$PY" -c 'import sys; from pacs_jax.config import load_config
print(load_config(sys.argv[1], sys.argv[2:]).trainer.run_dir)' configs/debug_cpu.yaml \
  ${OVERRIDES[@]+"${OVERRIDES[@]}"} 2>/dev/null)" || run_dir="(see trainer.run_dir in configs/debug_cpu.yaml)"
echo "Metrics (metrics.jsonl), plots and checkpoints: $run_dir"
