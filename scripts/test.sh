#!/usr/bin/env bash
# Installs the project with its test extras and runs the test suite (the README's second command).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e '.[test]'
python -m pytest -q -ra "$@"
