#!/usr/bin/env bash
# Set up (if needed) and run the embedded federated job: MiniLM + WordNet, 20 clients, FLoRG
# (configs/demo.toml: the built-in defaults with glosses cut at 20 tokens, to fit in 3 minutes on 2 cores).
# Extra arguments go to `florg run`, e.g. bash scripts/demo.sh --set train.rounds=4; with a --config of
# your own, that file replaces configs/demo.toml.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
for arg in "$@"; do
  case "$arg" in --config|--config=*|-c) exec .venv/bin/florg run "$@" ;; esac
done
exec .venv/bin/florg run --config configs/demo.toml "$@"
