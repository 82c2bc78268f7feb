#!/usr/bin/env bash
# Set up (if needed), lint (ruff, import-linter) and run the whole test suite. This is exactly what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The shape of the repository first (import order and style, layers and no cycles), then the behaviour.
.venv/bin/ruff check .
.venv/bin/lint-imports
.venv/bin/python -m pytest -q tests "$@"
