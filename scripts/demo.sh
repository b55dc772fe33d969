#!/usr/bin/env bash
# Set up (if needed) and run the embedded federated job: MiniLM + WordNet, 20 clients, FLoRG.
# Extra arguments go to `florg run`, e.g. bash scripts/demo.sh --set train.rounds=4
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
exec .venv/bin/florg run "$@"
