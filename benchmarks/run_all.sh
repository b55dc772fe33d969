#!/usr/bin/env bash
# Run the florg benchmarks and write benchmarks/RESULTS.md from the measured numbers.
#   bash benchmarks/run_all.sh            # CPU benchmarks (server aggregation, MiniLM client step, tiny-Llama crash test)
#   bash benchmarks/run_all.sh --cuda     # also the GPU client benchmark (Llama-3.2-1B shape, needs CUDA)
#   bash benchmarks/run_all.sh --quick    # smoke test with small sizes (report in the temp folder)
# Set PYTHON to use another interpreter (default: the project's .venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
if [ ! -x "$PY" ]; then PY="$(command -v python3)"; fi
exec "$PY" -m benchmarks.run_all "$@"
