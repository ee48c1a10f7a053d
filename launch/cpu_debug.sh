#!/usr/bin/env bash
# A newcomer's first command: install the project and train the tiny debug config on the CPU
# (a few minutes on a laptop; macOS's bash 3.2 works too). Extra arguments are config
# overrides, e.g. trainer.total_steps=5.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/cpu_debug.sh [--no-install] [--dry-run] [key=value ...]

Installs the project (python -m pip install -e .) and runs
  python -m pacs_jax train --config configs/debug_cpu.yaml [key=value ...]
  --no-install  skip the pip install (already done)
  --dry-run     print the commands instead of running them
Set PYTHON to choose the interpreter (default: python, else python3).
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

PY="${PYTHON:-$(command -v python || command -v python3 || true)}"
[[ -n $PY ]] || die "no python found: install Python 3.11+ or set PYTHON=/path/to/python"
cd "$REPO_ROOT"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"

((INSTALL)) && run "$PY" -m pip install -e .
run "$PY" -m pacs_jax train --config configs/debug_cpu.yaml ${OVERRIDES[@]+"${OVERRIDES[@]}"}

run_dir="$("$PY" -c 'import sys; from pacs_jax.config import load_config
print(load_config(sys.argv[1], sys.argv[2:]).trainer.run_dir)' configs/debug_cpu.yaml \
  ${OVERRIDES[@]+"${OVERRIDES[@]}"} 2>/dev/null)" || run_dir="(see trainer.run_dir in configs/debug_cpu.yaml)"
echo "Metrics (metrics.jsonl), plots and checkpoints: $run_dir"
