#!/usr/bin/env bash
# The README's second command: installs the project with its test extras (every version pinned by
# constraints.txt) into a virtual environment (scripts/python_env.sh says which), then runs the
# test suite. Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/test_rollout.py`.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/python_env.sh
source scripts/python_env.sh
choose_python
pip_install -e '.[test]'
# Two pytest workers, each test file whole on one worker (its module fixtures, e.g. a shared tiny
# training run, are built once): compiling and the tests' subprocesses overlap. PACS_JAX_TEST_WORKERS=0
# runs everything in one process.
"$PY" -m pytest -q -ra -n "${PACS_JAX_TEST_WORKERS:-2}" --dist loadfile "$@"
