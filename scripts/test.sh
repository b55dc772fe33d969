#!/usr/bin/env bash
# Set up (if needed), lint with ruff, and run the test suite. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
.venv/bin/ruff check src tests benchmarks examples scripts
exec .venv/bin/python -m pytest -q --durations=30 "$@"
