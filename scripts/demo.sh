#!/usr/bin/env bash
# Set up (if needed) and run the embedded federated job: MiniLM + WordNet, 20 clients, FLoRG
# (configs/demo.toml: the built-in defaults with glosses cut at 20 tokens, to fit in 3 minutes on 2 cores).
# Extra arguments go to `florg run`, e.g. bash scripts/demo.sh --set train.rounds=4; with a --config of
# your own, that file replaces configs/demo.toml.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
for arg in "$@"; do
  case "$arg" in --config|--config=*|-c) exec .venv/bin/florg run "$@" ;; esac
done
exec .venv/bin/florg run --config configs/demo.toml "$@"
