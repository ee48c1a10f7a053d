# shellcheck shell=bash
# Sourced by scripts/test.sh and launch/cpu_debug.sh: chooses the Python interpreter, so the
# README's two commands work on a fresh machine, including systems that refuse `pip install`
# into the system Python (PEP 668). Sets PY. In order:
#   1. $PYTHON, when set (the user's choice, used as is);
#   2. the active virtual environment ($VIRTUAL_ENV);
#   3. the project's own environment, $PACS_JAX_VENV (default .venv in the repository root),
#      created with `python3 -m venv` when missing, unless $1 is "existing" (no installing:
#      then the system python is used when that environment does not exist yet).

choose_python() {
  local mode=${1:-create} root venv base
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  if [[ -n ${PYTHON:-} ]]; then
    PY=$PYTHON
  elif [[ -n ${VIRTUAL_ENV:-} && -x $VIRTUAL_ENV/bin/python ]]; then
    PY=$VIRTUAL_ENV/bin/python
  else
    venv=${PACS_JAX_VENV:-$root/.venv}
    if [[ ! -x $venv/bin/python ]]; then
      base="$(command -v python3 || command -v python || true)"
      [[ -n $base ]] || { echo "error: no python found: install Python 3.11+ or set PYTHON=/path/to/python" >&2; return 1; }
      if [[ $mode == existing ]]; then
        PY=$base
        return 0
      fi
      echo "creating the virtual environment $venv (set PACS_JAX_VENV or PYTHON to choose another)" >&2
      "$base" -m venv "$venv" || { echo "error: '$base -m venv' failed: install your system's venv package (e.g. python3-venv) or set PYTHON" >&2; return 1; }
    fi
    PY=$venv/bin/python
  fi
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "error: $PY is older than Python 3.11: set PYTHON to a Python 3.11+ interpreter" >&2; return 1; }
}

# pip install into $PY with every dependency at the version pinned in constraints.txt.
pip_install() {
  local root
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  "$PY" -m pip install -q --disable-pip-version-check -c "$root/constraints.txt" "$@"
}
